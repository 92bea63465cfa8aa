// libp2p 3 needs Promise.withResolvers, which Node 20 lacks (../shared/NOTES.md).
import '../src/polyfills.js'
