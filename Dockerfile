# ovsflow with what its lab needs (Open vSwitch, iproute2, iptables, conntrack tools).
FROM debian:bookworm-slim
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        openvswitch-switch iproute2 iptables conntrack ethtool iputils-ping python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY . /src
RUN python3 -m venv /opt/ovsflow && /opt/ovsflow/bin/pip install --no-cache-dir /src
ENV PATH=/opt/ovsflow/bin:$PATH PYTHONPATH=/src
WORKDIR /src
ENTRYPOINT []
