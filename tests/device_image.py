"""`python` as the device lease's image runs it: without the packages of ours that image lacks
(/work/.library/device/KINDS.md lists what it holds; it has torch, torchvision, numpy, Pillow, psutil,
tqdm, matplotlib, protobuf, none of the SageMaker side). bench/gpu_check.sh runs there with the
image's python3, so a module it imports that needs one of these would end the lease's one run.
Usage, as the script calls its interpreter: device_image.py -c CODE [ARGS] | -m MODULE [ARGS]."""

import importlib.abc
import runpy
import sys

ABSENT = ("smdebug", "sagemaker_training", "sagemaker_inference", "sagemaker", "mms", "boto3", "botocore", "optuna")


class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the device image)", name=name)
        return None


def main() -> None:
    sys.meta_path.insert(0, Absent())
    flag, what, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    sys.path.insert(0, "")  # as `python -c` and `python -m` put the working directory first
    if flag == "-c":
        sys.argv = ["-c", *rest]
        exec(compile(what, "<string>", "exec"), {"__name__": "__main__"})
    elif flag == "-m":
        sys.argv = [what, *rest]
        runpy.run_module(what, run_name="__main__", alter_sys=True)
    else:
        raise SystemExit(f"device_image.py takes -c CODE or -m MODULE, got {flag!r}")


if __name__ == "__main__":
    main()
