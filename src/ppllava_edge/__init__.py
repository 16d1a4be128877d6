"""ppllava-edge: deployment toolchain for the PPLLaVA video LLM."""

__version__ = "0.1.0"
