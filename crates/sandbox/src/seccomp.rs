//! The seccomp filter every sandbox runs under: a classic BPF program bwrap loads (`--seccomp`)
//! before it starts what runs inside, so every process of the sandbox, OpenCode and the agent's
//! tools alike, has it and cannot drop it (`no_new_privs` is set).
//!
//! A deny list, as container runtimes keep: the kernel interfaces a build or test never needs
//! and that widen the kernel surface an exploit can reach, or act on the machine rather than the
//! process: keyrings, BPF, perf events, userfaultfd, io_uring, modules and kexec, mounts and the
//! new mount API, swap, reboot, the kernel log, clocks, quotas, handle-based opens, fanotify,
//! other processes' memory, and on x86-64 the x32 ABI and port I/O. A denied call fails with
//! `ENOSYS`, as if the kernel lacked it, so that programs fall back as they do on older kernels.
//! A syscall of another architecture (a 32-bit ABI) kills the process: the numbers below would
//! mean other calls there.

/// The filter's file under the sandbox's host-side `etc` directory.
pub(crate) const FILE: &str = "seccomp.bpf";

/// `ENOSYS`: the same number on every Linux architecture.
const ENOSYS: u32 = 38;

#[cfg(target_arch = "x86_64")]
mod arch {
    /// `AUDIT_ARCH_X86_64`.
    pub(super) const AUDIT: u32 = 0xc000_003e;
    /// Syscalls of the x32 ABI have this bit set.
    pub(super) const X32_BIT: Option<u32> = Some(0x4000_0000);
    /// x86-64 syscall numbers (`arch/x86/entry/syscalls/syscall_64.tbl`).
    pub(super) const DENIED: &[(&str, u32)] = &[
        ("iopl", 172),
        ("ioperm", 173),
        ("swapon", 167),
        ("swapoff", 168),
        ("reboot", 169),
        ("mount", 165),
        ("umount2", 166),
        ("pivot_root", 155),
        ("acct", 163),
        ("settimeofday", 164),
        ("adjtimex", 159),
        ("clock_settime", 227),
        ("clock_adjtime", 305),
        ("syslog", 103),
        ("quotactl", 179),
        ("init_module", 175),
        ("delete_module", 176),
        ("finit_module", 313),
        ("kexec_load", 246),
        ("kexec_file_load", 320),
        ("add_key", 248),
        ("request_key", 249),
        ("keyctl", 250),
        ("bpf", 321),
        ("perf_event_open", 298),
        ("userfaultfd", 323),
        ("io_uring_setup", 425),
        ("io_uring_enter", 426),
        ("io_uring_register", 427),
        ("name_to_handle_at", 303),
        ("open_by_handle_at", 304),
        ("fanotify_init", 300),
        ("process_vm_readv", 310),
        ("process_vm_writev", 311),
        ("open_tree", 428),
        ("move_mount", 429),
        ("fsopen", 430),
        ("fsconfig", 431),
        ("fsmount", 432),
        ("fspick", 433),
        ("mount_setattr", 442),
        ("vhangup", 153),
        ("uselib", 134),
    ];
}

#[cfg(target_arch = "aarch64")]
mod arch {
    /// `AUDIT_ARCH_AARCH64`.
    pub(super) const AUDIT: u32 = 0xc000_00b7;
    pub(super) const X32_BIT: Option<u32> = None;
    /// The generic syscall numbers (`include/uapi/asm-generic/unistd.h`).
    pub(super) const DENIED: &[(&str, u32)] = &[
        ("swapon", 224),
        ("swapoff", 225),
        ("reboot", 142),
        ("mount", 40),
        ("umount2", 39),
        ("pivot_root", 41),
        ("acct", 89),
        ("settimeofday", 170),
        ("adjtimex", 171),
        ("clock_settime", 112),
        ("clock_adjtime", 266),
        ("syslog", 116),
        ("quotactl", 60),
        ("init_module", 105),
        ("delete_module", 106),
        ("finit_module", 273),
        ("kexec_load", 104),
        ("kexec_file_load", 294),
        ("add_key", 217),
        ("request_key", 218),
        ("keyctl", 219),
        ("bpf", 280),
        ("perf_event_open", 241),
        ("userfaultfd", 282),
        ("io_uring_setup", 425),
        ("io_uring_enter", 426),
        ("io_uring_register", 427),
        ("name_to_handle_at", 264),
        ("open_by_handle_at", 265),
        ("fanotify_init", 262),
        ("process_vm_readv", 270),
        ("process_vm_writev", 271),
        ("open_tree", 428),
        ("move_mount", 429),
        ("fsopen", 430),
        ("fsconfig", 431),
        ("fsmount", 432),
        ("fspick", 433),
        ("mount_setattr", 442),
        ("vhangup", 58),
    ];
}

// classic BPF opcodes (linux/filter.h, linux/seccomp.h)
const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const RET_K: u16 = 0x06;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
/// `offsetof(struct seccomp_data, nr)` and `arch`.
const NR: u32 = 0;
const ARCH: u32 = 4;

/// The filter as bwrap reads it: `struct sock_filter` entries in native byte order.
pub(crate) fn program() -> Vec<u8> {
    let mut program: Vec<(u16, u8, u8, u32)> = vec![
        (LD_W_ABS, 0, 0, ARCH),
        (JEQ_K, 1, 0, arch::AUDIT),
        (RET_K, 0, 0, RET_KILL_PROCESS),
        (LD_W_ABS, 0, 0, NR),
    ];
    let denied = arch::DENIED.len();
    let checks = denied + usize::from(arch::X32_BIT.is_some());
    // each check jumps over the checks after it and the ALLOW to the ERRNO at the end
    let mut left = checks;
    if let Some(bit) = arch::X32_BIT {
        left -= 1;
        program.push((JGE_K, jump(left + 1), 0, bit));
    }
    for (_, nr) in arch::DENIED {
        left -= 1;
        program.push((JEQ_K, jump(left + 1), 0, *nr));
    }
    program.push((RET_K, 0, 0, RET_ALLOW));
    program.push((RET_K, 0, 0, RET_ERRNO | ENOSYS));
    program
        .into_iter()
        .flat_map(|(code, jt, jf, k)| {
            let mut entry = Vec::with_capacity(8);
            entry.extend_from_slice(&code.to_ne_bytes());
            entry.push(jt);
            entry.push(jf);
            entry.extend_from_slice(&k.to_ne_bytes());
            entry
        })
        .collect()
}

fn jump(over: usize) -> u8 {
    u8::try_from(over).expect("a seccomp jump spans at most 255 instructions")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_denial_jumps_to_the_errno_return() {
        let program = program();
        assert_eq!(program.len() % 8, 0);
        let entries: Vec<(u16, u8, u32)> = program
            .chunks(8)
            .map(|e| {
                (
                    u16::from_ne_bytes([e[0], e[1]]),
                    e[2],
                    u32::from_ne_bytes([e[4], e[5], e[6], e[7]]),
                )
            })
            .collect();
        let last = entries.len() - 1;
        assert_eq!(entries[last], (RET_K, 0, RET_ERRNO | ENOSYS));
        assert_eq!(entries[last - 1], (RET_K, 0, RET_ALLOW));
        let mut checks = 0;
        for (i, (code, jt, _)) in entries.iter().enumerate() {
            if *code == JGE_K || (*code == JEQ_K && i > 1) {
                assert_eq!(i + 1 + usize::from(*jt), last, "check {i} jumps elsewhere");
                checks += 1;
            }
        }
        assert_eq!(
            checks,
            arch::DENIED.len() + usize::from(arch::X32_BIT.is_some())
        );
    }
}
