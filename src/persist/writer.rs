//! Appending records to a log: encode into a reused buffer, append, report
//! where the record went and its whole size. Used by recovery (writing the
//! next generation) and by each shard's store while it runs, on the thread
//! that owns the log.

use bytes::BytesMut;

use super::clock::WallClock;
use super::record::Rec;
use crate::log::record::record_len;
use crate::log::{AppendError, Log};

/// A record encoder with its scratch buffer.
#[derive(Debug, Default)]
pub struct Writer {
    scratch: BytesMut,
}

impl Writer {
    /// Append `rec` to `log`; returns the segment it went into and its
    /// whole size in the log (header included).
    pub fn append(
        &mut self,
        log: &mut Log,
        clock: &WallClock,
        rec: &Rec,
    ) -> Result<(u64, u32), AppendError> {
        let size = self.encode(clock, rec);
        log.append(rec.kind(), &self.scratch)?;
        Ok((log.current_index(), size))
    }

    /// The whole size `rec` takes in a log.
    pub fn size(&mut self, clock: &WallClock, rec: &Rec) -> u32 {
        self.encode(clock, rec)
    }

    fn encode(&mut self, clock: &WallClock, rec: &Rec) -> u32 {
        self.scratch.clear();
        rec.encode(clock, &mut self.scratch);
        record_len(self.scratch.len()) as u32
    }
}
