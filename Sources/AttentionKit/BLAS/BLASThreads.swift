import Synchronization

/// Safe use of OpenBLAS's thread count, which is one setting for the whole process, from calls
/// that may run at the same time on several threads.
///
/// Each attention call takes a lease for the count it wants (the tiled kernel 1, because its
/// own threads split the work; the materialized kernel `threads`). The first lease saves the
/// setting it finds and applies its count; leases taken while others are held share the count
/// already applied (results do not depend on it: OpenBLAS splits a product's rows and columns,
/// never its sums); the last lease to end restores the saved setting. So after any number of
/// concurrent calls the setting is what it was before them.
///
/// What a program that uses AttentionKit must know: a change it makes to `BLAS.threadCount`
/// while an attention call is running is undone when the call ends.
enum BLASThreads {
  private struct State {
    var leases = 0
    var saved = 1
  }

  private static let state = Mutex(State())

  /// Runs `body` with OpenBLAS on `count` threads, or on the count of a lease already held.
  static func withCount<Result>(_ count: Int, _ body: () throws -> Result) rethrows -> Result {
    state.withLock { state in
      if state.leases == 0 {
        state.saved = BLAS.threadCount
        BLAS.threadCount = count
      }
      state.leases += 1
    }
    defer {
      state.withLock { state in
        state.leases -= 1
        if state.leases == 0 { BLAS.threadCount = state.saved }
      }
    }
    return try body()
  }
}
