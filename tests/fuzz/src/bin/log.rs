//! AFL++ entry point of the `log` target (see `src/lib.rs`).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        shardmq_fuzz::log(data);
    });
}
