//! AFL++ entry point of the `session` target (see `src/lib.rs`).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        shardmq_fuzz::session(data);
    });
}
