# The coordinator image (deploy/k8s/rsb-job.yaml's registry.example.com/rsb/
# coordinator): the `coordinator` binary alone on Debian 12 slim. It links
# neither libtorch nor CUDA, only glibc and libgcc_s.
#
# The binary is built on the host first and copied in; build on Debian 12
# (scripts/setup's machine) or older, since the image's glibc (2.36) must be
# at least the build host's. From the repository root:
#
#   cargo build --release -p rsb-coordinator
#   docker build -f deploy/docker/coordinator.Dockerfile \
#     -t registry.example.com/rsb/coordinator:0.1.0 .
#
# The tag is the workspace's version (Cargo.toml). The build context is the
# repository root; coordinator.Dockerfile.dockerignore, beside this file,
# keeps it to the one file copied (BuildKit, Docker's default builder, reads
# it), not target/ and .venv/, gigabytes.
FROM debian:12.11-slim

# Owned by root, not writable by the user the container runs as.
COPY target/release/coordinator /usr/local/bin/coordinator

# Not root: the manifest's pods run as 65532:65532 (runAsNonRoot), which
# this matches, so `docker run` without a user runs the same way.
USER 65532:65532
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/coordinator"]
