"""Tools agents may call: the Tool type, the @tool decorator, the registry,
and the built-in and fault-injection tool sets."""

from .base import Tool as Tool
from .base import ToolArgumentsError as ToolArgumentsError
from .base import ToolRegistry as ToolRegistry
from .base import tool as tool
from .builtin import builtin_tools as builtin_tools
from .chaos import chaos_tools as chaos_tools
