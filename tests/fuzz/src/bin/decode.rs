//! AFL++ entry point of the `decode` target (see `src/lib.rs`).

fn main() {
    afl::fuzz!(|data: &[u8]| {
        shardmq_fuzz::decode(data);
    });
}
