/// What `attn bench --format json` prints: the OpenBLAS core, the threads, the blocks `Bq` and
/// `Bk` as configured (each case's own tile is in its `tile_rows` and `tile_keys`), the machine's
/// limits and every case's figures.
struct BenchReport: Encodable {
  var openblasCore: String
  var threads: Int
  var queryBlock: Int
  var keyBlock: Int
  /// The FMA peak and the memory read bandwidth, measured in the same run.
  var limits: MachineLimits
  var cases: [BenchResult]
}
