"""The DeepSpeed training engine (installed as loctex.engine)."""
