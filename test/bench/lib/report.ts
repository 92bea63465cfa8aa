// Result rows, medians, ratios, targets, and the markdown table.

export type Better = 'higher' | 'lower'

export interface Target {
  /** Shown in the table, e.g. `≥ 1.0×`, `= 1.0× blob`, `≤ 200 MiB`. */
  text: string
  check: (r: Row) => boolean
}

export interface Row {
  scenario: string
  metric: string
  unit: string
  better: Better
  /** Medians (undefined when not measured). */
  pullmesh?: number
  distribution?: number
  /** pullmesh / distribution. */
  ratio?: number
  target?: Target
  met?: boolean
  samples: { pullmesh: number[], distribution: number[] }
  /** Set when the scenario did not run or failed. */
  status: 'ok' | 'not run' | 'failed'
  note?: string
  /** Label of the comparison column when it is not distribution (e.g. plain HTTP in the mesh scenario). */
  baseline?: string
}

export function median (xs: number[]): number | undefined {
  const v = xs.filter(Number.isFinite).sort((a, b) => a - b)
  if (v.length === 0) return undefined
  const m = Math.floor(v.length / 2)
  return v.length % 2 === 1 ? v[m] : (v[m - 1]! + v[m]!) / 2
}

export function row (scenario: string, metric: string, unit: string, better: Better, pm: number[], dist: number[], target?: Target, note?: string, baseline?: string): Row {
  const p = median(pm)
  const d = median(dist)
  const r: Row = {
    scenario, metric, unit, better, samples: { pullmesh: pm, distribution: dist }, status: 'ok',
    ...(p !== undefined ? { pullmesh: p } : {}),
    ...(d !== undefined ? { distribution: d } : {}),
    ...(p !== undefined && d !== undefined && d !== 0 ? { ratio: p / d } : {}),
    ...(target !== undefined ? { target } : {}),
    ...(note !== undefined ? { note } : {}),
    ...(baseline !== undefined ? { baseline } : {}),
  }
  if (target !== undefined) r.met = target.check(r)
  return r
}

export function notRun (scenario: string, reason: string, status: 'not run' | 'failed' = 'not run'): Row {
  return { scenario, metric: '—', unit: '', better: 'higher', samples: { pullmesh: [], distribution: [] }, status, note: reason }
}

// ---- targets

export const ratioAtLeast = (x: number): Target => ({ text: `≥ ${x.toFixed(1)}×`, check: r => r.ratio !== undefined && r.ratio >= x })
export const ratioAtMost = (x: number): Target => ({ text: `≤ ${x.toFixed(1)}×`, check: r => r.ratio !== undefined && r.ratio <= x })
export const absAtMost = (x: number, text: string): Target => ({ text, check: r => r.pullmesh !== undefined && r.pullmesh <= x })
/** pullmesh's value exceeds the baseline's by at most `x` (in the row's unit), e.g. TTFB within +20 ms. */
export const diffAtMost = (x: number, text: string): Target => ({ text, check: r => r.pullmesh !== undefined && r.distribution !== undefined && r.pullmesh - r.distribution <= x })
/** pullmesh's value equals `x` exactly (e.g. upstream bytes = 1.0 × blob). */
export const exactly = (x: number, text: string): Target => ({ text, check: r => r.pullmesh !== undefined && Math.abs(r.pullmesh - x) < 1e-9 })
/** pullmesh's value is the best of the two (lowest or highest). */
export const best = (): Target => ({ text: 'fastest', check: r => r.pullmesh !== undefined && r.distribution !== undefined && (r.better === 'lower' ? r.pullmesh <= r.distribution : r.pullmesh >= r.distribution) })

// ---- formatting

const GiB = 1024 ** 3
const MiB = 1024 ** 2

export function fmt (v: number | undefined, unit: string): string {
  if (v === undefined || !Number.isFinite(v)) return '—'
  switch (unit) {
    case 'B/s': return v >= GiB ? `${(v / GiB).toFixed(2)} GiB/s` : `${(v / MiB).toFixed(0)} MiB/s`
    case 'B': return v >= GiB ? `${(v / GiB).toFixed(2)} GiB` : `${(v / MiB).toFixed(1)} MiB`
    case 's': return v < 1 ? `${(v * 1000).toFixed(v < 0.01 ? 2 : 0)} ms` : `${v.toFixed(2)} s`
    case 'ms': return `${v.toFixed(2)} ms`
    case 'rps': return `${v.toFixed(0)}/s`
    case 'x': return `${v.toFixed(2)}×`
    default: return `${v.toFixed(2)} ${unit}`
  }
}

export function markdown (rows: Row[], header: string): string {
  const lines = [header, '', '| scenario | metric | pullmesh | distribution | ratio (pm/dist) | target | met? |', '| --- | --- | --- | --- | --- | --- | --- |']
  for (const r of rows) {
    if (r.status !== 'ok') {
      lines.push(`| ${r.scenario} | ${r.status}: ${(r.note ?? '').replace(/\|/g, '/').replace(/\n/g, ' ').slice(0, 300)} | | | | | |`)
      continue
    }
    const dist = fmt(r.distribution, r.unit) + (r.baseline !== undefined ? ` (${r.baseline})` : '')
    const n = Math.max(r.samples.pullmesh.length, r.samples.distribution.length)
    const metric = `${r.metric}${n > 1 ? ` (median of ${n})` : ''}${r.note !== undefined ? ` — ${r.note}` : ''}`
    const met = r.met === undefined ? '' : r.met ? 'yes' : '**no**'
    lines.push(`| ${r.scenario} | ${metric} | ${fmt(r.pullmesh, r.unit)} | ${dist} | ${r.ratio === undefined ? '—' : r.ratio.toFixed(2) + '×'} | ${r.target?.text ?? ''} | ${met} |`)
  }
  return lines.join('\n') + '\n'
}

export function toJson (rows: Row[]): unknown[] {
  return rows.map(r => ({ ...r, target: r.target?.text }))
}
