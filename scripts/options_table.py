"""Print the README's options table from the declarations in agent/config.py."""

from agent.config import options_table

print(options_table())
