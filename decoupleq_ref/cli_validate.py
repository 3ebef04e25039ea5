"""Oracle commands (validate): see issue #6."""
