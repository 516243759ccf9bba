/* Make this process see an x86 CPU of a lesser kind: CPUID answers with the AVX-512, VNNI and AMX bits cleared.
 *
 * onnxruntime's MLAS, numpy, OpenBLAS and the tokenizers crate pick their kernels from CPUID when they load;
 * nothing else switches them. Loaded by LD_PRELOAD (bench/cpu_mask.py builds and runs it), the constructor
 * turns on CPUID faulting (arch_prctl ARCH_SET_CPUID 0, Linux 4.12+, CPUs with the cpuid_fault flag), so
 * every CPUID instruction in the process raises SIGSEGV; the handler runs the real CPUID with faulting off
 * for that instant, clears the bits of the kind asked for in QUANTFN_CPU_KIND and steps over the
 * instruction. Threads inherit faulting; execve resets it and the child's own LD_PRELOAD sets it again.
 *
 *   QUANTFN_CPU_KIND=avx2     AVX2 + FMA, no AVX-512, no AVX-VNNI, no AMX (what Lambda x86 promises)
 *   QUANTFN_CPU_KIND=avx512   AVX-512 with VNNI, no AMX
 *
 * glibc reads CPUID before any constructor runs, so its string functions keep the host's choice; nothing
 * measured here depends on them.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

static int kind_avx2;

static long set_cpuid(int enabled) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, enabled); }

static void mask(uint32_t leaf, uint32_t sub, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d) {
    if (leaf == 7 && sub == 0) {
        /* EDX: AMX-BF16 22, AMX-TILE 24, AMX-INT8 25 (both kinds); AVX512-4VNNIW 2, -4FMAPS 3,
           -VP2INTERSECT 8, -FP16 23 */
        *d &= ~(BIT(22) | BIT(24) | BIT(25));
        if (kind_avx2) {
            /* EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31 */
            *b &= ~(BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31));
            /* ECX: VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14 */
            *c &= ~(BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14));
            *d &= ~(BIT(2) | BIT(3) | BIT(8) | BIT(23));
        }
    } else if (leaf == 7 && sub == 1) {
        /* EAX: AMX-FP16 21 (both); AVX-VNNI 4, AVX512-BF16 5, AVX-IFMA 23; EDX: AVX-VNNI-INT8 4,
           AVX-NE-CONVERT 5, AMX-COMPLEX 8 */
        *a &= ~BIT(21);
        *d &= ~BIT(8);
        if (kind_avx2) {
            *a &= ~(BIT(4) | BIT(5) | BIT(23));
            *d &= ~(BIT(4) | BIT(5));
        }
    } else if (leaf == 0x1d || leaf == 0x1e) {
        *a = *b = *c = *d = 0; /* AMX tile and TMUL information */
    }
    (void)c;
}

static void on_fault(int signal, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *regs = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)regs[REG_RIP];
    (void)info;
    if (ip[0] != 0x0f || ip[1] != 0xa2) { /* a real fault: let it happen as it would have */
        struct sigaction plain = {0};
        plain.sa_handler = SIG_DFL;
        sigaction(signal, &plain, NULL);
        return;
    }
    uint32_t leaf = (uint32_t)regs[REG_RAX], sub = (uint32_t)regs[REG_RCX], a, b, c, d;
    set_cpuid(1);
    __cpuid_count(leaf, sub, a, b, c, d);
    set_cpuid(0);
    mask(leaf, sub, &a, &b, &c, &d);
    regs[REG_RAX] = a;
    regs[REG_RBX] = b;
    regs[REG_RCX] = c;
    regs[REG_RDX] = d;
    regs[REG_RIP] += 2;
}

__attribute__((constructor)) static void start(void) {
    const char *kind = getenv("QUANTFN_CPU_KIND");
    if (kind == NULL || (strcmp(kind, "avx2") != 0 && strcmp(kind, "avx512") != 0)) {
        fprintf(stderr, "cpuid_mask: QUANTFN_CPU_KIND must be avx2 or avx512\n");
        _exit(2);
    }
    kind_avx2 = strcmp(kind, "avx2") == 0;
    struct sigaction action = {0};
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, NULL);
    if (set_cpuid(0) != 0) {
        perror("cpuid_mask: arch_prctl(ARCH_SET_CPUID) (this CPU or kernel has no CPUID faulting)");
        _exit(2);
    }
}
