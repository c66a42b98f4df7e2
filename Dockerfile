# netra server image: slim Python 3.13, non-root, `netra serve` as entry point.
#
#   docker run -p 8000:8000 -e NETRA_JWT_SECRET=... netra
#
# It listens on 0.0.0.0, so it needs a key: NETRA_JWT_SECRET (HS256), or
# NETRA_JWT_ALGORITHMS=RS256 with NETRA_JWT_PUBLIC_KEY. Without one
# `netra serve` refuses to start (exit status 2, one line saying what to
# set): development mode, which hands a token to anyone who asks, only ever
# listens on loopback.
FROM python:3.13-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NETRA_DATA_DIR=/var/lib/netra \
    NETRA_HOST=0.0.0.0 \
    NETRA_PORT=8000 \
    NETRA_DRAIN_GRACE_S=5

WORKDIR /app
COPY pyproject.toml README.md ./
COPY netra ./netra
RUN pip install . \
 && useradd --system --uid 10001 --home-dir /var/lib/netra --create-home netra

USER netra
EXPOSE 8000
# Follows NETRA_PORT (and NETRA_HOST when it names one interface).
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; host = os.environ.get('NETRA_HOST', '127.0.0.1'); host = '127.0.0.1' if host in ('', '0.0.0.0', '::', '[::]') else host; host = f'[{host}]' if ':' in host and not host.startswith('[') else host; port = os.environ.get('NETRA_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://{host}:{port}/healthz', timeout=2).status == 200 else 1)"]
# SIGTERM drains: runs get NETRA_DRAIN_GRACE_S (5 s here) to finish, then
# clients get close 1001 within NETRA_CLOSE_TIMEOUT_S + 1 (3 s): 8 s, inside
# `docker stop`'s default 10 s. For a longer grace, raise the stop timeout to
# at least grace + 5 s: `docker run --stop-timeout 30 -e NETRA_DRAIN_GRACE_S=25`
# (compose: `stop_grace_period`; Kubernetes: `terminationGracePeriodSeconds`).
STOPSIGNAL SIGTERM
ENTRYPOINT ["netra"]
# Host and port come from NETRA_HOST / NETRA_PORT above (flags would
# override them and the health check could no longer follow the port).
CMD ["serve"]
