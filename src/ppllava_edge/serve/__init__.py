"""OpenAI-compatible HTTP server over the torch-free runtime (`ppllava-edge serve`; needs the `serve` extra)."""
