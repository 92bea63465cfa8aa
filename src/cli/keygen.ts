import type { Command } from 'commander'
import { open } from 'node:fs/promises'
import type { CliIo } from './index.js'

export function registerKeygen (program: Command, io: CliIo, setExit: (code: number) => void): void {
  program.command('keygen')
    .description('write a new mesh key: only nodes started with --mesh-key FILE holding it can join the mesh')
    .argument('<file>', 'where to write the key (created with mode 0600; never overwritten)')
    .action(async (file: string) => {
      try {
        const { generateMeshKey } = await import('../mesh/index.js')
        const fh = await open(file, 'wx', 0o600)
        try {
          await fh.writeFile(generateMeshKey())
          await fh.sync()
        } finally {
          await fh.close()
        }
        io.stderr.write(`mesh key written to ${file}; copy it to every node and start them with --mesh-key ${file}\n`)
      } catch (err) {
        io.stderr.write(`pullmesh keygen: ${(err as NodeJS.ErrnoException).code === 'EEXIST' ? `${file} exists; refusing to overwrite it` : (err as Error).message}\n`)
        setExit(1)
      }
    })
}
