import Synchronization

/// Safe use of OpenBLAS's thread count, which is one setting for the whole process, from calls
/// that may run at the same time on several threads.
///
/// Every kernel splits its work over its own threads and runs each product with OpenBLAS on one
/// thread (OpenBLAS's threading would split a product differently for different thread counts,
/// and its sums then differ in the last bits). Each call takes a lease for that count: the first
/// lease saves the setting it finds and applies its count; leases taken while others are held
/// share it; the last lease to end restores the saved setting. So after any number of
/// concurrent calls the setting is what it was before them.
///
/// What a program that uses AttentionKit must know: a change it makes to `BLAS.threadCount`
/// while an attention call is running is undone when the call ends, and its own OpenBLAS calls
/// made meanwhile run on one thread.
public enum BLASThreads {
  private struct State {
    var leases = 0
    var saved = 1
  }

  private static let state = Mutex(State())

  /// Runs `body` with OpenBLAS on `count` threads, or on the count of a lease already held.
  public static func withCount<Result>(_ count: Int, _ body: () throws -> Result) rethrows -> Result
  {
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
