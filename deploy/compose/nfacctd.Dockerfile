# A stand-in for the pmacct/nfacctd image, which needs Docker Hub: Debian's pmacct package
# (nfacctd 1.7.7), configured by the nfacctd.conf that docker-compose.yml mounts, with
# Antrea's fields from deploy/pmacct/primitives.lst (mounted at /etc/pmacct/primitives.lst).
FROM debian:bookworm-slim
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        pmacct \
    && rm -rf /var/lib/apt/lists/*
CMD ["nfacctd", "-f", "/etc/pmacct/nfacctd.conf"]
