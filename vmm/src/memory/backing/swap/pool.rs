//! TEMPORARY stub (replaced by the real module).
#![allow(dead_code, unused_variables, clippy::all, clippy::pedantic)]
pub const PAGE: usize = 4096;
pub const CHUNK: usize = 256 << 10;
pub const MAX_STORED: usize = 3072;
pub type PoolHandle = u32;
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PoolError {
    #[error("pool handle {0:#x} does not name a live entry")]
    BadHandle(u32),
    #[error("pool entry {0:#x} does not decompress to a page")]
    Corrupt(u32),
    #[error("cannot map pool memory")]
    Map,
}
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub capacity: u64,
    pub bytes: u64,
    pub chunks: u64,
    pub entries: u64,
    pub stored_bytes: u64,
    pub inserts: u64,
    pub removes: u64,
    pub rejected: u64,
    pub retired_chunks: u64,
}
#[derive(Debug)]
pub struct Pool;
impl Pool {
    pub fn new(capacity: u64) -> Pool {
        Pool
    }
    pub fn compress(&mut self, page: &[u8], out: &mut [u8]) -> Option<usize> {
        None
    }
    pub fn insert(&mut self, gfn: u64, compressed: &[u8]) -> Option<PoolHandle> {
        None
    }
    pub fn load(&self, h: PoolHandle, out: &mut [u8]) -> Result<(), PoolError> {
        Err(PoolError::BadHandle(h))
    }
    pub fn remove(&mut self, h: PoolHandle) -> Result<u64, PoolError> {
        Err(PoolError::BadHandle(h))
    }
    pub fn gfn_of(&self, h: PoolHandle) -> Result<u64, PoolError> {
        Err(PoolError::BadHandle(h))
    }
    pub fn has_room(&self, len: usize) -> bool {
        false
    }
    pub fn oldest_live(&self) -> Vec<(u64, PoolHandle)> {
        Vec::new()
    }
    pub fn retire_oldest(&mut self) {}
    pub fn bytes(&self) -> u64 {
        0
    }
    pub fn capacity(&self) -> u64 {
        0
    }
    pub fn set_capacity(&mut self, capacity: u64) {}
    pub fn over_capacity(&self) -> u64 {
        0
    }
    pub fn stats(&self) -> PoolStats {
        PoolStats::default()
    }
    pub fn metadata_bytes(&self) -> u64 {
        0
    }
    pub fn check_invariants(&self) -> Result<(), String> {
        Ok(())
    }
}
