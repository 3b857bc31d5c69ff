"""python -m dtkernels info   : how this copy was built and what it can run."""
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "info":
        print(__doc__.strip())
        return 0 if not argv else 2
    import dtkernels

    for k, v in dtkernels.build_info().items():
        print(f"{k:24s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
