# ovsflow with what its lab needs (Open vSwitch, iproute2, iptables, conntrack tools).
# Build it from a clone, with the tag deploy/kubernetes/ovsflow.yaml names:
#   docker build -t ovsflow:0.1.0 .
FROM debian:bookworm-slim
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        openvswitch-switch iproute2 iptables conntrack ethtool iputils-ping python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
# The dependencies (and the build backend) from pyproject.toml in a layer of their own, so a
# change to the source reinstalls only ovsflow, without the network.
COPY pyproject.toml /src/
RUN python3 -m venv /opt/ovsflow \
    && python3 -c 'import tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb")); \
print(*p["build-system"]["requires"], *p["project"]["dependencies"], sep="\n")' >/tmp/deps \
    && /opt/ovsflow/bin/pip install --no-cache-dir -r /tmp/deps && rm /tmp/deps
COPY . /src
RUN /opt/ovsflow/bin/pip install --no-cache-dir --no-deps --no-build-isolation /src
ENV PATH=/opt/ovsflow/bin:$PATH PYTHONPATH=/src
WORKDIR /src
ENTRYPOINT []
