//! Storage buffers: byte ranges that kernels read and write, uploads, and read-backs that
//! work natively and in the browser.

use crate::error::{Error, Result};

use super::context::WgslContext;

/// A byte range of a buffer holding one tensor. `offset` must be a multiple of the device's
/// `min_storage_buffer_offset_alignment` (256 everywhere we run), `size` covers the tensor.
#[derive(Clone, Copy, Debug)]
pub struct BufSlice<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
}

impl<'a> BufSlice<'a> {
    /// The whole buffer.
    pub fn whole(buffer: &'a wgpu::Buffer) -> Self {
        BufSlice {
            buffer,
            offset: 0,
            size: buffer.size(),
        }
    }
}

/// Usages every tensor buffer gets: bound as storage, filled and read by copies.
pub const TENSOR_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_DST)
    .union(wgpu::BufferUsages::COPY_SRC);

impl WgslContext {
    /// A storage buffer of `size` bytes (rounded up to 16). Errors when the device cannot
    /// hold a buffer that large.
    pub fn create_buffer(&self, label: &str, size: u64) -> Result<wgpu::Buffer> {
        let size = size.max(16).next_multiple_of(16);
        if size > self.limits.max_buffer_size {
            return Err(Error::backend(
                "wgsl",
                format!(
                    "buffer {label:?} needs {size} bytes but adapter {:?} allows at most {} per buffer \
                     (maxBufferSize); use a shorter sequence, a smaller micro-batch or model, or the cpu device",
                    self.info.name, self.limits.max_buffer_size
                ),
            ));
        }
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: TENSOR_USAGE,
            mapped_at_creation: false,
        }))
    }

    /// A storage buffer holding `data` (padded with zeros to a multiple of 16 bytes).
    pub fn upload(&self, label: &str, data: &[u8]) -> Result<wgpu::Buffer> {
        let buf = self.create_buffer(label, data.len() as u64)?;
        self.write(&buf, 0, data);
        Ok(buf)
    }

    /// Queue a write of `data` at byte `offset`; a trailing partial word is zero-padded.
    pub fn write(&self, buf: &wgpu::Buffer, offset: u64, data: &[u8]) {
        if data.len().is_multiple_of(4) {
            self.queue.write_buffer(buf, offset, data);
        } else {
            let mut padded = data.to_vec();
            padded.resize(data.len().next_multiple_of(4), 0);
            self.queue.write_buffer(buf, offset, &padded);
        }
    }

    /// Copy `size` bytes at `offset` of `buf` to the host. Natively this waits for the GPU;
    /// in the browser it resolves when the mapping completes.
    pub async fn read(&self, buf: &wgpu::Buffer, offset: u64, size: u64) -> Result<Vec<u8>> {
        let padded = size.next_multiple_of(4);
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: padded.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(buf, offset, &staging, 0, padded);
        self.queue.submit([enc.finish()]);
        let (tx, rx) = futures_channel::oneshot::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        #[cfg(not(target_arch = "wasm32"))]
        self.wait_idle()?;
        let mapped = rx
            .await
            .map_err(|_| Error::backend("wgsl", "read-back was cancelled"))?;
        mapped.map_err(|e| Error::backend("wgsl", format!("mapping a read-back buffer failed: {e}")))?;
        let out = {
            let view = staging
                .get_mapped_range(..)
                .map_err(|e| Error::backend("wgsl", format!("read-back range: {e}")))?;
            view[..size as usize].to_vec()
        };
        staging.unmap();
        Ok(out)
    }

    /// [`WgslContext::read`] of f32 values, waiting on the calling thread.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn read_f32(&self, buf: &wgpu::Buffer, offset: u64, count: usize) -> Result<Vec<f32>> {
        let bytes = pollster::block_on(self.read(buf, offset, count as u64 * 4))?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Fill `size` bytes at `offset` with a repeated 32-bit pattern (e.g. NaN bits).
    pub fn fill_u32(&self, buf: &wgpu::Buffer, offset: u64, size: u64, pattern: u32) {
        // write_buffer stages through host memory; chunk it so huge fills stay bounded.
        const CHUNK: u64 = 16 << 20;
        let words = vec![pattern; (CHUNK / 4) as usize];
        let mut done = 0;
        while done < size {
            let n = (size - done).min(CHUNK) & !3;
            if n == 0 {
                break;
            }
            self.queue
                .write_buffer(buf, offset + done, bytemuck::cast_slice(&words[..(n / 4) as usize]));
            done += n;
        }
    }
}
