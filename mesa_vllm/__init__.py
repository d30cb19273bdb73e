"""mesa-vllm: Mesa-Extrapolation as a vLLM attention backend plugin."""

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point (placeholder until the backend lands)."""
