export { createMesh, generateMeshKey } from './mesh.js'
export type { MeshComponents, MeshCounters, MeshNode } from './mesh.js'
export type { Mesh, MeshInit, MeshStatus, MeshPeerStatus, PeerHolder, PeerTagRecord, PeerOutcome } from './types.js'
export { ANNOUNCE_TOPIC, INVENTORY_PROTOCOL, MAX_GOSSIP_BYTES } from './messages.js'
