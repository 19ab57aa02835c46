//! The few VFIO ioctls the NVMe driver needs, through `libc` directly.
//!
//! Why raw ioctls rather than the `vfio-ioctls` crate: the driver uses ten
//! ioctls and four small structs from `linux/vfio.h` (type1 container, group,
//! device fd, region info, DMA map/unmap). `vfio-ioctls` brings
//! `vmm-sys-util`, `vfio-bindings`, `kvm` feature plumbing and a
//! VMM-oriented object model built around KVM device fds; here the structs are
//! declared once with `const` layout assertions against the UAPI and the
//! calls stay visible where `unsafe` begins.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::FileExt;

const VFIO_TYPE: u32 = b';' as u32;
const VFIO_BASE: u32 = 100;

const fn vfio_io(nr: u32) -> libc::c_ulong {
    ((VFIO_TYPE << 8) | (VFIO_BASE + nr)) as libc::c_ulong
}

const VFIO_GET_API_VERSION: libc::c_ulong = vfio_io(0);
const VFIO_CHECK_EXTENSION: libc::c_ulong = vfio_io(1);
const VFIO_SET_IOMMU: libc::c_ulong = vfio_io(2);
const VFIO_GROUP_GET_STATUS: libc::c_ulong = vfio_io(3);
const VFIO_GROUP_SET_CONTAINER: libc::c_ulong = vfio_io(4);
const VFIO_GROUP_GET_DEVICE_FD: libc::c_ulong = vfio_io(6);
const VFIO_DEVICE_GET_REGION_INFO: libc::c_ulong = vfio_io(8);
const VFIO_IOMMU_GET_INFO: libc::c_ulong = vfio_io(12);
const VFIO_IOMMU_MAP_DMA: libc::c_ulong = vfio_io(13);
const VFIO_IOMMU_UNMAP_DMA: libc::c_ulong = vfio_io(14);

const VFIO_API_VERSION: i32 = 0;
const VFIO_TYPE1_IOMMU: libc::c_ulong = 1;
const VFIO_TYPE1V2_IOMMU: libc::c_ulong = 3;
const VFIO_GROUP_FLAGS_VIABLE: u32 = 1;
const VFIO_DMA_MAP_FLAG_READ: u32 = 1;
const VFIO_DMA_MAP_FLAG_WRITE: u32 = 2;
const VFIO_REGION_INFO_FLAG_MMAP: u32 = 4;
const VFIO_IOMMU_INFO_CAPS: u32 = 2;
const VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE: u16 = 1;

/// PCI region indices of vfio-pci.
pub const BAR0_REGION: u32 = 0;
pub const CONFIG_REGION: u32 = 7;

#[repr(C)]
#[derive(Default)]
struct GroupStatus {
    argsz: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default, Clone, Copy, Debug)]
pub struct RegionInfo {
    argsz: u32,
    pub flags: u32,
    index: u32,
    cap_offset: u32,
    pub size: u64,
    pub offset: u64,
}

#[repr(C)]
struct DmaMap {
    argsz: u32,
    flags: u32,
    vaddr: u64,
    iova: u64,
    size: u64,
}

#[repr(C)]
struct DmaUnmap {
    argsz: u32,
    flags: u32,
    iova: u64,
    size: u64,
}

#[repr(C)]
struct IommuInfo {
    argsz: u32,
    flags: u32,
    iova_pgsizes: u64,
    cap_offset: u32,
    pad: u32,
}

const _: () = {
    assert!(std::mem::size_of::<GroupStatus>() == 8);
    assert!(std::mem::size_of::<RegionInfo>() == 32);
    assert!(std::mem::offset_of!(RegionInfo, size) == 16);
    assert!(std::mem::size_of::<DmaMap>() == 32);
    assert!(std::mem::offset_of!(DmaMap, iova) == 16);
    assert!(std::mem::size_of::<DmaUnmap>() == 24);
    assert!(std::mem::size_of::<IommuInfo>() == 24);
};

fn last_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// The IOMMU group of a PCI function, from `/sys/bus/pci/devices/BDF/iommu_group`.
pub fn iommu_group(bdf: &str) -> Result<u32, String> {
    let link = format!("/sys/bus/pci/devices/{bdf}/iommu_group");
    let target = std::fs::read_link(&link).map_err(|e| {
        format!("{link}: {e} (no such PCI device, or no IOMMU: boot with intel_iommu=on)")
    })?;
    target
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("{link} points at {}, not a group number", target.display()))
}

/// A type1 container holding one group and the device fd of one PCI function.
pub struct VfioDevice {
    container: File,
    _group: File,
    device: File,
    /// IOVA ranges the IOMMU accepts (inclusive ends), from the type1 info capability.
    pub iova_ranges: Vec<(u64, u64)>,
}

impl VfioDevice {
    /// Opens `/dev/vfio/vfio`, the device's group, sets the type1 IOMMU and gets the device fd.
    pub fn open(bdf: &str) -> Result<VfioDevice, String> {
        let group_id = iommu_group(bdf)?;
        let rw = |path: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| format!("{path}: {e}"))
        };
        let container = rw("/dev/vfio/vfio")?;
        let group_path = format!("/dev/vfio/{group_id}");
        let group = rw(&group_path).map_err(|e| {
            format!("{e} (is {bdf} bound to vfio-pci? see README 'NVMe through VFIO')")
        })?;
        // SAFETY: VFIO_GET_API_VERSION takes no argument.
        let api = unsafe { libc::ioctl(container.as_raw_fd(), VFIO_GET_API_VERSION) };
        if api != VFIO_API_VERSION {
            return Err(format!(
                "/dev/vfio/vfio: API version {api}, kiln knows {VFIO_API_VERSION}"
            ));
        }
        let mut status = GroupStatus {
            argsz: std::mem::size_of::<GroupStatus>() as u32,
            flags: 0,
        };
        // SAFETY: the kernel writes one vfio_group_status into `status`.
        if unsafe { libc::ioctl(group.as_raw_fd(), VFIO_GROUP_GET_STATUS, &mut status) } < 0 {
            return Err(last_err(&format!("{group_path}: VFIO_GROUP_GET_STATUS")));
        }
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(format!(
                "{group_path}: IOMMU group {group_id} is not viable (bind every device in it to vfio-pci)"
            ));
        }
        let container_fd: RawFd = container.as_raw_fd();
        // SAFETY: the argument is a pointer to the container fd, read by the kernel.
        if unsafe { libc::ioctl(group.as_raw_fd(), VFIO_GROUP_SET_CONTAINER, &container_fd) } < 0 {
            return Err(last_err(&format!("{group_path}: VFIO_GROUP_SET_CONTAINER")));
        }
        // SAFETY: VFIO_CHECK_EXTENSION takes an integer argument.
        let v2 = unsafe {
            libc::ioctl(
                container.as_raw_fd(),
                VFIO_CHECK_EXTENSION,
                VFIO_TYPE1V2_IOMMU,
            )
        } > 0;
        let iommu = if v2 {
            VFIO_TYPE1V2_IOMMU
        } else {
            VFIO_TYPE1_IOMMU
        };
        // SAFETY: VFIO_SET_IOMMU takes an integer argument.
        if unsafe { libc::ioctl(container.as_raw_fd(), VFIO_SET_IOMMU, iommu) } < 0 {
            return Err(last_err("/dev/vfio/vfio: VFIO_SET_IOMMU type1"));
        }
        let name = CString::new(bdf).map_err(|_| format!("PCI address '{bdf}' has a NUL"))?;
        // SAFETY: the argument is a NUL-terminated string the kernel only reads.
        let fd = unsafe { libc::ioctl(group.as_raw_fd(), VFIO_GROUP_GET_DEVICE_FD, name.as_ptr()) };
        if fd < 0 {
            return Err(last_err(&format!(
                "{group_path}: VFIO_GROUP_GET_DEVICE_FD {bdf}"
            )));
        }
        // SAFETY: the kernel returned a new fd that nothing else owns.
        let device = unsafe { File::from_raw_fd(fd) };
        let iova_ranges = iova_ranges(&container).unwrap_or_else(|| vec![(0, (1u64 << 39) - 1)]);
        Ok(VfioDevice {
            container,
            _group: group,
            device,
            iova_ranges,
        })
    }

    pub fn region_info(&self, index: u32) -> Result<RegionInfo, String> {
        let mut info = RegionInfo {
            argsz: std::mem::size_of::<RegionInfo>() as u32,
            index,
            ..RegionInfo::default()
        };
        // SAFETY: the kernel fills one vfio_region_info of `argsz` bytes.
        if unsafe {
            libc::ioctl(
                self.device.as_raw_fd(),
                VFIO_DEVICE_GET_REGION_INFO,
                &mut info,
            )
        } < 0
        {
            return Err(last_err(&format!("VFIO_DEVICE_GET_REGION_INFO {index}")));
        }
        Ok(info)
    }

    pub fn region_mmappable(info: &RegionInfo) -> bool {
        info.flags & VFIO_REGION_INFO_FLAG_MMAP != 0
    }

    /// Maps `len` bytes of a region shared and read-write.
    pub fn mmap_region(&self, info: &RegionInfo, len: usize) -> Result<*mut u8, String> {
        // SAFETY: a fresh shared mapping of the device fd; the kernel checks the range.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.device.as_raw_fd(),
                info.offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(last_err(&format!(
                "mmap of {len} bytes of BAR{}",
                info.index
            )));
        }
        Ok(ptr as *mut u8)
    }

    pub fn config_read16(&self, config: &RegionInfo, at: u64) -> Result<u16, String> {
        let mut b = [0u8; 2];
        self.device
            .read_exact_at(&mut b, config.offset + at)
            .map_err(|e| format!("PCI config read at {at:#x}: {e}"))?;
        Ok(u16::from_le_bytes(b))
    }

    pub fn config_write16(&self, config: &RegionInfo, at: u64, value: u16) -> Result<(), String> {
        self.device
            .write_all_at(&value.to_le_bytes(), config.offset + at)
            .map_err(|e| format!("PCI config write at {at:#x}: {e}"))
    }

    /// Maps `[vaddr, vaddr+size)` at `iova` for device reads and writes; pins the pages.
    ///
    /// # Safety
    /// The memory must stay mapped until [`VfioDevice::unmap_dma`] of the same range,
    /// and the caller must expect the device to write it.
    pub unsafe fn map_dma(&self, vaddr: *const u8, size: u64, iova: u64) -> Result<(), String> {
        let map = DmaMap {
            argsz: std::mem::size_of::<DmaMap>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: vaddr as u64,
            iova,
            size,
        };
        // SAFETY: `map` is a valid vfio_iommu_type1_dma_map; the caller keeps the memory.
        if unsafe { libc::ioctl(self.container.as_raw_fd(), VFIO_IOMMU_MAP_DMA, &map) } < 0 {
            return Err(last_err(&format!(
                "VFIO_IOMMU_MAP_DMA of {size} bytes at IOVA {iova:#x}"
            )));
        }
        Ok(())
    }

    pub fn unmap_dma(&self, iova: u64, size: u64) -> Result<(), String> {
        let mut unmap = DmaUnmap {
            argsz: std::mem::size_of::<DmaUnmap>() as u32,
            flags: 0,
            iova,
            size,
        };
        // SAFETY: `unmap` is a valid vfio_iommu_type1_dma_unmap the kernel may update.
        if unsafe { libc::ioctl(self.container.as_raw_fd(), VFIO_IOMMU_UNMAP_DMA, &mut unmap) } < 0
        {
            return Err(last_err(&format!(
                "VFIO_IOMMU_UNMAP_DMA of {size} bytes at IOVA {iova:#x}"
            )));
        }
        Ok(())
    }
}

/// Reads the IOVA-range capability of the type1 IOMMU (Linux 5.4+).
fn iova_ranges(container: &File) -> Option<Vec<(u64, u64)>> {
    let mut buf = vec![0u64; 512];
    let bytes = buf.len() * 8;
    let head = buf.as_mut_ptr() as *mut IommuInfo;
    // SAFETY: `buf` is 4 KiB, aligned for u64, large enough for the header.
    unsafe {
        (*head).argsz = bytes as u32;
    }
    // SAFETY: the kernel writes at most `argsz` bytes into `buf`.
    if unsafe { libc::ioctl(container.as_raw_fd(), VFIO_IOMMU_GET_INFO, head) } < 0 {
        return None;
    }
    // SAFETY: the kernel filled the header.
    let (argsz, flags, mut cap) = unsafe { ((*head).argsz, (*head).flags, (*head).cap_offset) };
    if flags & VFIO_IOMMU_INFO_CAPS == 0 || argsz as usize > bytes {
        return None;
    }
    // SAFETY: `buf` holds `bytes` initialised bytes.
    let raw = unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const u8, bytes) };
    let u16_at = |at: usize| u16::from_le_bytes([raw[at], raw[at + 1]]);
    let u32_at = |at: usize| u32::from_le_bytes(raw[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(raw[at..at + 8].try_into().unwrap());
    while cap != 0 && (cap as usize) + 16 <= bytes {
        let at = cap as usize;
        if u16_at(at) == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
            let n = u32_at(at + 8) as usize;
            let ranges: Vec<(u64, u64)> = (0..n)
                .map(|i| at + 16 + 16 * i)
                .take_while(|&r| r + 16 <= bytes)
                .map(|r| (u64_at(r), u64_at(r + 8)))
                .collect();
            return (!ranges.is_empty()).then_some(ranges);
        }
        cap = u32_at(at + 4);
    }
    None
}

/// IOVA windows of `window_bytes`, aligned to their size, that lie wholly
/// inside the IOMMU's usable ranges at or above 4 GiB (below it sit the
/// x86 MSI window and other reserved holes). At most `max` of them.
pub fn iova_windows(ranges: &[(u64, u64)], window_bytes: u64, max: usize) -> Vec<u64> {
    let mut out = Vec::new();
    for &(start, end) in ranges {
        let mut base = start.max(1 << 32).next_multiple_of(window_bytes);
        while base
            .checked_add(window_bytes - 1)
            .is_some_and(|last| last <= end)
            && out.len() < max
        {
            out.push(base);
            base += window_bytes;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_vfio_h() {
        assert_eq!(VFIO_GET_API_VERSION, 0x3b64);
        assert_eq!(VFIO_SET_IOMMU, 0x3b66);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD, 0x3b6a);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO, 0x3b6c);
        assert_eq!(VFIO_IOMMU_MAP_DMA, 0x3b71);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA, 0x3b72);
    }

    #[test]
    fn iova_windows_skip_low_memory_and_holes() {
        // QEMU's intel-iommu: 39-bit space with the MSI hole below 4 GiB.
        let ranges = [(0, 0xfedf_ffff), (0xfef0_0000, (1 << 39) - 1)];
        let w = iova_windows(&ranges, 4 << 30, 1000);
        assert_eq!(w[0], 4 << 30);
        assert_eq!(w.len(), 127);
        assert_eq!(*w.last().unwrap(), (1 << 39) - (4 << 30));
        assert_eq!(iova_windows(&ranges, 4 << 30, 3).len(), 3);
        assert!(iova_windows(&[(0, 0xffff_ffff)], 4 << 30, 8).is_empty());
    }
}
