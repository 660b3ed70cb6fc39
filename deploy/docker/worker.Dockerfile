# The worker image (deploy/k8s/rsb-job.yaml's registry.example.com/rsb/
# worker): the `worker` binary with the libtorch it was built against, which
# comes from the PyPI torch wheel that python/torch.txt pins (torch==2.11.0;
# its Linux x86_64 wheel is the CUDA 13.0 build, cu130, and brings the
# nvidia-* wheels: the CUDA runtime, cuBLAS, cuDNN, NCCL). No CUDA toolkit:
# the driver's libraries come from the node, put in the container by the
# NVIDIA container toolkit for the pod's nvidia.com/gpu.
#
# The binary is built on the host first (against the same pinned torch in
# .venv) and copied in; build on Debian 12 (scripts/setup's machine) or
# older, since the image's glibc (2.36) must be at least the build host's.
# From the repository root:
#
#   cargo build --release -p rsb-worker
#   docker build -f deploy/docker/worker.Dockerfile \
#     -t registry.example.com/rsb/worker:0.1.0 .
#
# The tag is the workspace's version (Cargo.toml). The build context is the
# repository root; worker.Dockerfile.dockerignore, beside this file, keeps it
# to the two files copied (BuildKit, Docker's default builder, reads it), not
# target/ and .venv/, gigabytes.
FROM python:3.12.11-slim-bookworm

# torch, as pinned, in a venv of its own (about 4.7 GB with its CUDA
# libraries). Its pip is the one on PATH, which hadolint checks as pip.
ENV PATH=/opt/torch/bin:$PATH
COPY python/torch.txt /opt/torch.txt
RUN python -m venv /opt/torch \
    && pip install --no-cache-dir --disable-pip-version-check -r /opt/torch.txt

# The binary's rpath names the build host's .venv/libtorch/lib; here the
# loader finds libtorch by LD_LIBRARY_PATH, and libtorch finds the nvidia-*
# libraries by its own rpaths. The container toolkit mounts the driver's
# compute libraries (libcuda) when asked for them.
ENV LD_LIBRARY_PATH=/opt/torch/lib/python3.12/site-packages/torch/lib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Owned by root, not writable by the user the container runs as.
COPY target/release/worker /usr/local/bin/worker

# Not root: the manifest's pods run as 65532:65532 (runAsNonRoot), which
# this matches, so `docker run` without a user runs the same way.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/worker"]
