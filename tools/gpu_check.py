"""make gpu-check: the GPU machine's check (incomplete: only the device detection exists yet).

Without a CUDA device it exits at once with a message. With one, it says that the build, test,
sanitizer and benchmark steps are not written yet and exits 1, rather than pretending to pass.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--report-dir", default="gpu-check-report")
    p.add_argument("--jobs", type=int, default=None)
    p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible to torch "
              f"{torch.__version__} (CUDA {torch.version.cuda}); nothing was run", file=sys.stderr)
        return 2
    major, minor = torch.cuda.get_device_capability()
    print(f"gpu-check: found {torch.cuda.get_device_name()} (sm_{major}{minor}); the build, "
          "CUDA tests, sanitizer and benchmark steps are not implemented yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
