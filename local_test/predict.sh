#!/usr/bin/env bash
# Send one file to a running endpoint's /invocations and print the answer.
#
#   local_test/predict.sh FILE [CONTENT_TYPE]
#
# CONTENT_TYPE defaults from the file's extension (.jpg .png .webp .bmp .json .npy).
# ENDPOINT (default http://localhost:${SAGEMAKER_BIND_TO_PORT:-8080}) picks the server,
# TOP_K sets top_k through X-Amzn-SageMaker-Custom-Attributes, ACCEPT the response type.
set -euo pipefail
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: $0 FILE [CONTENT_TYPE]" >&2; exit 2
fi
file=$1
[ -f "$file" ] || { echo "error: $file is not a file" >&2; exit 2; }
if [ $# -eq 2 ]; then
  ctype=$2
else
  case "${file,,}" in
    *.jpg|*.jpeg) ctype=image/jpeg ;;
    *.png) ctype=image/png ;;
    *.webp) ctype=image/webp ;;
    *.bmp) ctype=image/bmp ;;
    *.json) ctype=application/json ;;
    *.npy) ctype=application/x-npy ;;
    *) echo "error: cannot tell the content type of $file: pass it as the second argument" >&2; exit 2 ;;
  esac
fi
endpoint=${ENDPOINT:-http://localhost:${SAGEMAKER_BIND_TO_PORT:-8080}}
args=(-sS --fail-with-body -X POST "$endpoint/invocations" -H "Content-Type: $ctype"
      -H "Accept: ${ACCEPT:-application/json}" --data-binary "@$file")
[ -n "${TOP_K:-}" ] && args+=(-H "X-Amzn-SageMaker-Custom-Attributes: top_k=$TOP_K")
rc=0
curl "${args[@]}" || rc=$?
echo
exit $rc
