#!/usr/bin/env bash
# Build the training and serving images and push them to Amazon ECR.
#
#   ./build_and_push.sh [--only train|serve] [--prefix NAME] [--tag TAG] [--region REGION] [--no-push] [-- BUILD_ARGS...]
#
#   --only      build (and push) one image
#   --prefix    image names are PREFIX-train and PREFIX-serve (default: imgcls)
#   --tag       default: the git short commit; `latest` is tagged too
#   --region    default: $AWS_REGION, $AWS_DEFAULT_REGION, then `aws configure get region`
#   --no-push   build and tag locally only; no AWS call
#   -- ...      passed to every build command, e.g.
#               -- --build-arg BASE_IMAGE=ubuntu:22.04 -v /etc/ssl/certs/ca.crt:/run/ca.crt:ro
#
# DOCKER picks the engine (default docker; podman works). REGISTRY overrides the registry host
# (default ACCOUNT.dkr.ecr.REGION.amazonaws.com, .com.cn in China regions). The last two lines
# printed are the image URIs, for launch.py.
set -euo pipefail
cd "$(dirname "$0")"

die() { echo "error: $*" >&2; exit 1; }

only="" prefix=imgcls tag="" region="" push=1
build_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --only) only=${2:-}; shift 2 || die "--only needs train or serve" ;;
    --prefix) prefix=${2:-}; shift 2 || die "--prefix needs a name" ;;
    --tag) tag=${2:-}; shift 2 || die "--tag needs a value" ;;
    --region) region=${2:-}; shift 2 || die "--region needs a value" ;;
    --no-push) push=0; shift ;;
    --) shift; build_args=("$@"); break ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
case "$only" in ""|train|serve) ;; *) die "--only must be train or serve, not '$only'" ;; esac
[[ "$prefix" =~ ^[a-z0-9]+([._-][a-z0-9]+)*$ ]] || die "--prefix '$prefix' is not a valid repository name (lowercase letters, digits, . _ -)"
if [ -z "$tag" ]; then
  tag=$(git rev-parse --short HEAD 2>/dev/null || echo dev)
fi
[[ "$tag" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "--tag '$tag' is not a valid image tag"

engine=${DOCKER:-docker}
command -v "$engine" >/dev/null || die "container engine '$engine' not found: install Docker, or set DOCKER=podman"
"$engine" info >/dev/null 2>&1 || die "'$engine info' failed: is the engine running and may this user use it?"

images=(train serve)
[ -n "$only" ] && images=("$only")

registry=""
if [ "$push" = 1 ]; then
  command -v aws >/dev/null || die "the aws CLI is not installed (pip install awscli, or use --no-push)"
  if [ -z "$region" ]; then
    region=${AWS_REGION:-${AWS_DEFAULT_REGION:-$(aws configure get region 2>/dev/null || true)}}
  fi
  [ -n "$region" ] || die "no AWS region: pass --region, or set AWS_REGION, or run 'aws configure'"
  account=$(aws sts get-caller-identity --query Account --output text --region "$region" 2>/dev/null) \
    || die "no usable AWS credentials ('aws sts get-caller-identity' failed): run 'aws configure' or set AWS_PROFILE"
  domain=amazonaws.com
  [[ "$region" == cn-* ]] && domain=amazonaws.com.cn
  registry=${REGISTRY:-$account.dkr.ecr.$region.$domain}
fi

for image in "${images[@]}"; do
  name="$prefix-$image"
  echo "== building $name:$tag ($engine)" >&2
  start=$SECONDS
  "$engine" build --platform linux/amd64 -f "docker/$image.Dockerfile" -t "$name:$tag" -t "$name:latest" \
    ${build_args[@]+"${build_args[@]}"} . >&2
  echo "== built $name:$tag in $((SECONDS - start)) s" >&2
done

if [ "$push" = 0 ]; then
  for image in "${images[@]}"; do echo "$prefix-$image:$tag"; done
  exit 0
fi

echo "== logging in to $registry" >&2
aws ecr get-login-password --region "$region" | "$engine" login --username AWS --password-stdin "$registry" >&2 \
  || die "login to $registry failed"
uris=()
for image in "${images[@]}"; do
  name="$prefix-$image"
  if ! aws ecr describe-repositories --region "$region" --repository-names "$name" >/dev/null 2>&1; then
    echo "== creating ECR repository $name" >&2
    aws ecr create-repository --region "$region" --repository-name "$name" >/dev/null \
      || die "could not create the ECR repository $name"
  fi
  for t in "$tag" latest; do
    "$engine" tag "$name:$tag" "$registry/$name:$t"
    echo "== pushing $registry/$name:$t" >&2
    start=$SECONDS
    "$engine" push "$registry/$name:$t" >&2 || die "push of $registry/$name:$t failed"
    echo "== pushed in $((SECONDS - start)) s" >&2
  done
  uris+=("$registry/$name:$tag")
done
printf '%s\n' "${uris[@]}"
