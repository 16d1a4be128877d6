"""NVIDIA Triton Inference Server: a model repository made from an export folder, the launcher and the client.

- `protocol.py`: the `ppllava` model's tensors (names, Triton types, shapes) and request options; used by all three.
- `repository.py`: `write_repository(EXPORT, OUT, ...)` (`ppllava-edge triton-repo`).
- `python_model.py`: the Python-backend model (`TritonPythonModel`) that runs the torch-free runtime in Triton.
- `server.py`: starts the `tritonserver` carried by the nvidia-pytriton wheel on loopback (`ppllava-edge triton-serve`).
- `client.py`: gRPC streaming client (`ppllava-edge ask --triton URL ...`).

Nothing here imports torch, transformers, tritonclient or Triton's `triton_python_backend_utils` at module level.
"""
