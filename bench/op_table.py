"""Print the op benchmark table and write JSON: the same as `eft-fast bench --op`.

    python bench/op_table.py [--device cpu|cuda] [--quick] [--out DIR]
"""
import sys

from eft_fast.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "--op", *sys.argv[1:]]))
