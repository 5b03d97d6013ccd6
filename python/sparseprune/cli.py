"""The `sparseprune` command. (stub)"""
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["info"]:
        from .info import main as info_main
        return info_main()
    print("usage: sparseprune info")
    return 2


if __name__ == "__main__":
    sys.exit(main())
