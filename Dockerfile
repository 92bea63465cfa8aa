# syntax=docker/dockerfile:1
# pullmesh: a LAN-meshed, verified OCI pull-through cache.
#   docker build -t pullmesh .
#   docker run -d --network host -v pullmesh-data:/var/lib/pullmesh pullmesh
# Host networking is what makes mDNS peer discovery work; see deploy/ for compose, systemd and Kubernetes.

ARG NODE_IMAGE=node:22-bookworm-slim

# ---- build: all dependencies, compile TypeScript to dist/
FROM ${NODE_IMAGE} AS build
WORKDIR /src
COPY package.json package-lock.json ./
# --ignore-scripts: `prepare` would run tsc before the sources are here (classic-level ships prebuilt binaries).
RUN npm ci --ignore-scripts --no-audit --no-fund
COPY tsconfig.json ./
COPY src ./src
RUN npx tsc -p tsconfig.json

# ---- production dependencies only
FROM ${NODE_IMAGE} AS deps
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts --no-audit --no-fund && npm cache clean --force

# ---- runtime
FROM ${NODE_IMAGE} AS runtime
ENV NODE_ENV=production \
    PULLMESH_DATA_DIR=/var/lib/pullmesh
RUN groupadd --system --gid 10001 pullmesh \
 && useradd --system --uid 10001 --gid pullmesh --home-dir /var/lib/pullmesh --no-create-home --shell /usr/sbin/nologin pullmesh \
 && mkdir -p /var/lib/pullmesh && chown pullmesh:pullmesh /var/lib/pullmesh && chmod 0750 /var/lib/pullmesh
WORKDIR /app
COPY --from=deps /app/node_modules ./node_modules
COPY --from=build /src/dist ./dist
COPY package.json ./
USER 10001:10001
VOLUME ["/var/lib/pullmesh"]
# 5000: registry (clients), 4001: libp2p mesh, 5050: peer data path.
EXPOSE 5000 4001 5050
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:5000/healthz').then(r => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["node", "dist/main.js"]
# Flags beat PULLMESH_* variables: set the rest (upstreams, mesh key ...) through the environment.
CMD ["start", "--listen", "0.0.0.0:5000"]
