"""Print the README's options table from the declarations in agent/config.py;
with --write, replace the table in README.md between its markers."""

import re
import sys
from pathlib import Path

from agent.config import options_table

README = Path(__file__).resolve().parents[1] / "README.md"

if "--write" in sys.argv:
    text = README.read_text()
    new = re.sub(r"(<!-- options:begin -->\n).*?(\n<!-- options:end -->)",
                 lambda m: m.group(1) + options_table() + m.group(2), text, flags=re.S)
    README.write_text(new)
else:
    print(options_table())
