"""Placeholder replaced below."""
def add_arguments(parser):
    pass
