// fakecuda.cpp: a stand-in for libcuda.so.1 and libnvrtc.so that runs wrnc's kernels on the CPU
// with cuda_emu.h, so that the GPU runtime (device, executor, trainer, selftest, bench) runs end
// to end on a machine without a GPU. Tests and `scripts/fakegpu.sh` build it:
//
//   g++ -O1 -std=c++20 -shared -fPIC -pthread -DWRNC_FAKE_EMU_DIR='"<repo>/emu"'
//       emu/fakecuda.cpp -o libwrnc_fakecuda.so -ldl
//
// and point both WRNC_LIBCUDA and WRNC_NVRTC at the result.
//
// How a kernel runs. The fake NVRTC's "PTX" is the CUDA source itself behind a marker line
// (`//WRNC-FAKE-PTX`), so it survives wrnc's on-disk PTX cache. cuModuleLoadDataEx writes a
// wrapper that includes emu_all.h (cuda_emu.h and cuda_emu_mma.h, precompiled once per header
// version, see pch_dir) and that source, plus one trampoline per `extern "C" __global__` kernel; g++ builds
// it into a shared object (kept by source hash in $WRNC_FAKE_BUILD_DIR, default
// $TMPDIR/wrnc-fakecuda-<uid>), which is dlopen-ed. A trampoline
// unpacks cuLaunchKernel's `void** kernelParams` by the kernel's own C++ parameter types, so
// the argument marshalling of the runtime is checked exactly as the real driver would read it.
//
// What the fake checks that a GPU would also reject (it returns the same error codes):
// - every pointer argument of a launch points into a live allocation (else
//   CUDA_ERROR_ILLEGAL_ADDRESS, sticky, and a line on stderr naming the kernel and argument);
// - a kernel that writes past either end of an allocation breaks its guard bytes (checked
//   after every launch: CUDA_ERROR_ILLEGAL_ADDRESS, sticky);
// - synchronous copies, memsets, allocations and stream synchronisation while a stream is
//   being captured (CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED), block sizes over 1024, dynamic
//   shared memory beyond 48 KiB unless the kernel opted in (cuFuncSetAttribute
//   MAX_DYNAMIC_SHARED_SIZE_BYTES, at most 227 KiB, as on sm_90);
// - new allocations are filled with 0xff bytes (NaN as floats), so code that reads memory it
//   never wrote shows up.
// Memory: WRNC_FAKE_MEM_MB (default 81920) is the device's size; allocations past it fail with
// CUDA_ERROR_OUT_OF_MEMORY. Kernels run synchronously at launch; events time host wall clock.
// Graphs: a capture records launches with copies of their argument bytes; a replay runs them.
// WRNC_FAKE_REAL_NVRTC, when set to a real libnvrtc, makes nvrtcCompileProgram also compile
// the source with it (same options, but a real architecture `sm_XY` taken as `compute_XY`:
// PTX only, without ptxas's time), so the fake never accepts what NVRTC would refuse.
// The fake's "CUBIN" (nvrtcGetCUBIN) is a 64-byte ELF64 header for EM_CUDA with no program or
// section headers, then its "PTX": wrnc's module cache keeps only entries whose ELF header
// holds together, and cuModuleLoadDataEx skips that header.
// WRNC_FAKE_STATS=FILE: at exit the process writes its counts there, one `name value` a line:
// `captures` (graphs captured), `graph_launches`, `graph_kernels` (kernels those ran) and
// `stream_kernels` (kernels launched outside graphs), so tests can see how work was submitted.

#include <dirent.h>
#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_emu_tma.h"

#ifndef WRNC_FAKE_EMU_DIR
#error "build with -DWRNC_FAKE_EMU_DIR='\"<repo>/emu\"'"
#endif

namespace {

using CUresult = int;
using CUdeviceptr = unsigned long long;

constexpr CUresult OK = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, INVALID_DEVICE = 101,
                   INVALID_IMAGE = 200, INVALID_HANDLE = 400, NOT_FOUND = 500,
                   ILLEGAL_ADDRESS = 700, CAPTURE_UNSUPPORTED = 900, CAPTURE_INVALIDATED = 901;

constexpr std::size_t GUARD = 256;  // guard bytes before and after every allocation
constexpr unsigned char GUARD_BYTE = 0xa5;
// carries a `.version` line, as every PTX does (wrnc's PTX cache checks for it)
const char* MARKER = "//WRNC-FAKE-PTX\n.version 0.0 // the CUDA source follows\n";
// what the fake's CUBIN starts with: an ELF64 little-endian header for EM_CUDA (190) whose
// program and section header tables are empty
std::string elf_header() {
    std::string h(64, '\0');
    h[0] = 0x7f, h[1] = 'E', h[2] = 'L', h[3] = 'F';
    h[4] = 2, h[5] = 1, h[6] = 1;  // 64-bit, little endian, version 1
    h[16] = 2;                      // ET_EXEC
    h[18] = (char)190;              // e_machine EM_CUDA
    h[52] = 64;                     // e_ehsize
    return h;
}

std::recursive_mutex g_mu;
CUresult g_sticky = OK;  // an illegal address poisons the context, as on a GPU

struct Alloc {
    unsigned char* base;  // GUARD bytes, then `bytes`, then GUARD bytes
    std::size_t bytes;
};
std::map<CUdeviceptr, Alloc> g_allocs;  // keyed by the user-visible address
std::size_t g_used = 0;

std::size_t total_mem() {
    const char* e = std::getenv("WRNC_FAKE_MEM_MB");
    unsigned long long mb = e ? std::strtoull(e, nullptr, 10) : 81920ull;
    return (std::size_t)mb << 20;
}

using Launch = void (*)(unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void**);
// The opt-in limit of shared memory per block (sm_90's 227 KiB; WRNC_FAKE_SMEM_OPTIN bytes
// when set, to play a smaller GPU) and the limit without opting in.
constexpr unsigned SMEM_DEFAULT = 49152;
unsigned smem_optin() {
    const char* e = std::getenv("WRNC_FAKE_SMEM_OPTIN");
    return e ? (unsigned)std::strtoul(e, nullptr, 10) : 232448u;
}
struct Kernel {
    std::string name;
    Launch launch;
    unsigned max_dynamic = SMEM_DEFAULT;  // cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)
    std::vector<std::size_t> arg_size;
    std::vector<bool> arg_ptr;
};
struct Module {
    void* so;
    std::map<std::string, Kernel*> kernels;
};
struct Recorded {
    Kernel* k;
    unsigned g[3], b[3], shared;
    std::vector<std::vector<unsigned char>> args;
};
struct Graph {
    std::vector<Recorded> launches;
};
struct Stream {
    Graph* capture = nullptr;
    bool invalidated = false;
    bool non_blocking = false;  // CU_STREAM_NON_BLOCKING: no ordering with the legacy stream
};
struct Event {
    std::chrono::steady_clock::time_point t;
    bool recorded = false;
};

bool any_capture = false;  // some stream is capturing (thread-local mode: ours is the only thread)
// A copy or memset on the legacy (NULL) stream that a GPU may still be running: the
// synchronous cuMemcpyHtoD from pageable memory returns once the data is staged, before the
// DMA lands, cuMemsetD8 and cuMemcpyDtoD return at once; nothing orders them before work on
// a non-blocking stream. Cleared by what waits for the legacy stream (cuCtxSynchronize,
// cuStreamSynchronize(0), a cuMemcpyDtoH). A launch on a non-blocking stream meanwhile fails.
bool g_legacy_pending = false;
static CUresult legacy_order_check(void* stream, const char* what) {
    if (g_legacy_pending && stream && ((Stream*)stream)->non_blocking) {
        std::fprintf(stderr,
                     "fakecuda: %s on a non-blocking stream while a copy or memset on the legacy stream "
                     "may still run (on a GPU nothing orders them: copy on the stream instead)\n",
                     what);
        return INVALID_VALUE;
    }
    return OK;
}

// What WRNC_FAKE_STATS reports at exit.
struct Stats {
    unsigned long long captures = 0, graph_launches = 0, graph_kernels = 0, stream_kernels = 0;
    ~Stats() {
        const char* p = std::getenv("WRNC_FAKE_STATS");
        if (!p || !*p) return;
        if (FILE* f = std::fopen(p, "w")) {
            std::fprintf(f, "captures %llu\ngraph_launches %llu\ngraph_kernels %llu\nstream_kernels %llu\n",
                         captures, graph_launches, graph_kernels, stream_kernels);
            std::fclose(f);
        }
    }
} g_stats;

CUresult fail(CUresult r, const char* what) {
    if (std::getenv("WRNC_FAKE_VERBOSE")) std::fprintf(stderr, "fakecuda: %s -> %d\n", what, r);
    return r;
}

// The allocation holding [p, p + len), or null.
const Alloc* find(CUdeviceptr p, std::size_t len) {
    auto it = g_allocs.upper_bound(p);
    if (it == g_allocs.begin()) return nullptr;
    --it;
    if (p < it->first || p + len > it->first + it->second.bytes) return nullptr;
    return &it->second;
}

bool guards_ok(const Alloc& a) {
    for (std::size_t i = 0; i < GUARD; ++i)
        if (a.base[i] != GUARD_BYTE || a.base[GUARD + a.bytes + i] != GUARD_BYTE) return false;
    return true;
}

// Captured or not: checks and runs one launch.
CUresult run_launch(Kernel* k, const unsigned g[3], const unsigned b[3], unsigned shared, void** args) {
    if (g_sticky) return g_sticky;
    for (std::size_t i = 0; i < k->arg_ptr.size(); ++i) {
        if (!k->arg_ptr[i]) continue;
        CUdeviceptr p = 0;
        std::memcpy(&p, args[i], sizeof(p));
        if (!find(p, 0)) {
            std::fprintf(stderr,
                         "fakecuda: kernel %s: argument %zu (0x%llx) is not in any live allocation\n",
                         k->name.c_str(), i, p);
            return g_sticky = ILLEGAL_ADDRESS;
        }
    }
    k->launch(g[0], g[1], g[2], b[0], b[1], b[2], shared, args);
    for (auto& [p, a] : g_allocs)
        if (!guards_ok(a)) {
            std::fprintf(stderr,
                         "fakecuda: kernel %s wrote outside allocation 0x%llx (%zu bytes)\n",
                         k->name.c_str(), p, a.bytes);
            return g_sticky = ILLEGAL_ADDRESS;
        }
    return OK;
}

// ---- building a module from its source ----

std::string hex_hash(const std::string& s) {
    unsigned long long h = 1469598103934665603ull;  // FNV-1a 64
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    char buf[17];
    std::snprintf(buf, sizeof buf, "%016llx", h);
    return buf;
}

std::vector<std::string> kernel_names(const std::string& src) {
    std::vector<std::string> out;
    const std::string key = "extern \"C\" __global__ void ";
    for (std::size_t at = src.find(key); at != std::string::npos; at = src.find(key, at + 1)) {
        std::size_t s = at + key.size();
        if (src.compare(s, 17, "__launch_bounds__") == 0) {
            std::size_t close = src.find(')', s);
            if (close == std::string::npos) break;
            s = close + 1;
            while (s < src.size() && src[s] == ' ') ++s;
        }
        std::size_t e = s;
        while (e < src.size() && (std::isalnum((unsigned char)src[e]) || src[e] == '_')) ++e;
        if (e > s) out.push_back(src.substr(s, e - s));
    }
    return out;
}

bool write_file(const std::string& path, const std::string& text) {
    FILE* f = std::fopen(path.c_str(), "wb");
    if (!f) return false;
    bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
    return std::fclose(f) == 0 && ok;
}

std::string build_dir() {
    if (const char* d = std::getenv("WRNC_FAKE_BUILD_DIR"); d && *d) return d;
    const char* t = std::getenv("TMPDIR");
    return std::string(t && *t ? t : "/tmp") + "/wrnc-fakecuda-" + std::to_string(getuid());
}

void set_log(const std::string& msg, unsigned n, int* opts, void** vals) {
    char* buf = nullptr;
    std::size_t cap = 0;
    for (unsigned i = 0; i < n; ++i) {
        if (opts[i] == 5) buf = (char*)vals[i];
        if (opts[i] == 6) cap = (std::size_t)(std::uintptr_t)vals[i];
    }
    if (buf && cap) {
        std::snprintf(buf, cap, "%s", msg.c_str());
    }
    std::fprintf(stderr, "fakecuda: %s\n", msg.c_str());
}

// How modules are compiled (the precompiled header is built with the same flags).
const char* const CXX_FLAGS = " -O1 -std=c++20 -pthread -w -fPIC -fvisibility=hidden";

std::string cxx() {
    const char* c = std::getenv("CXX");
    return c && *c ? c : "g++";
}

// The emulation headers' text (part of every module's key: a changed header rebuilds them).
const std::string& emu_headers() {
    static const std::string text = [] {
        std::string t;
        for (const char* h : {"/emu_all.h", "/cuda_emu.h", "/cuda_emu_mma.h", "/cuda_emu_tma.h"}) {
            if (FILE* f = std::fopen((std::string(WRNC_FAKE_EMU_DIR) + h).c_str(), "rb")) {
                char buf[4096];
                for (std::size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) t.append(buf, n);
                std::fclose(f);
            }
        }
        return t;
    }();
    return text;
}

// A directory holding, when g++ could build it, `emu_all.h.gch`: emu/emu_all.h precompiled,
// which saves every module the parsing of the headers (about 0.4 s each). Built once per header
// version, atomically (tests build modules from several processes at once); searched before
// the emulation's directory, so that without it (or when g++ finds it invalid) the text header
// is used.
std::string pch_dir(const std::string& dir) {
    const std::string p = dir + "/pch-" + hex_hash(emu_headers() + CXX_FLAGS);
    const std::string gch = p + "/emu_all.h.gch";
    if (access(gch.c_str(), R_OK) == 0) return p;
    mkdir(p.c_str(), 0700);
    const std::string tmp = p + "/tmp." + std::to_string(getpid());
    const std::string cmd = cxx() + CXX_FLAGS + " -x c++-header '" WRNC_FAKE_EMU_DIR "/emu_all.h' -o '" + tmp +
                            ".gch' 2> /dev/null";
    if (std::system(cmd.c_str()) == 0) std::rename((tmp + ".gch").c_str(), gch.c_str());
    std::remove((tmp + ".gch").c_str());
    return p;
}

// Builds (or reuses) the shared object for `src`; null and a message on failure.
void* load_so(const std::string& src, std::string& err) {
    const std::string dir = build_dir();
    mkdir(dir.c_str(), 0700);
    // the emulation headers are part of the key (and the wrapper's version: v3 includes
    // emu_all.h, maybe precompiled)
    const std::string key = src + "\n//fakecuda wrapper v3\n" + emu_headers();
    const std::string id = hex_hash(key);
    const std::string so = dir + "/" + id + ".so";
    if (access(so.c_str(), R_OK) != 0) {
        auto names = kernel_names(src);
        std::string w =
            "#include \"emu_all.h\"\n#include \"" + id + ".cu\"\n"
            "template <class... P, std::size_t... I>\n"
            "void fk_call(void (*k)(P...), dim3 g, dim3 b, unsigned sh, void** a, std::index_sequence<I...>) {\n"
            "    wrnc_emu::launch(k, g, b, sh, *static_cast<std::remove_cv_t<P>*>(a[I])...);\n}\n"
            "template <class... P> void fk_launch(void (*k)(P...), unsigned gx, unsigned gy, unsigned gz,\n"
            "    unsigned bx, unsigned by, unsigned bz, unsigned sh, void** a) {\n"
            "    fk_call(k, dim3(gx, gy, gz), dim3(bx, by, bz), sh, a, std::index_sequence_for<P...>{});\n}\n"
            "template <class... P> int fk_argc(void (*)(P...)) { return sizeof...(P); }\n"
            "template <class... P> unsigned long fk_size(void (*)(P...), int i) {\n"
            "    unsigned long s[] = {sizeof(P)..., 0}; return s[i]; }\n"
            "template <class... P> int fk_ptr(void (*)(P...), int i) {\n"
            "    int s[] = {(int)std::is_pointer_v<P>..., 0}; return s[i]; }\n"
            "struct FkEntry { const char* name; void (*launch)(unsigned, unsigned, unsigned, unsigned,"
            " unsigned, unsigned, unsigned, void**); int argc; unsigned long (*size)(int); int (*ptr)(int); };\n"
            "static FkEntry FK[] = {\n";
        for (auto& n : names) {
            w += "  {\"" + n + "\", [](unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,"
                 " unsigned bz, unsigned sh, void** a) { fk_launch(" + n + ", gx, gy, gz, bx, by, bz, sh, a); }, fk_argc(" +
                 n + "), [](int i) { return fk_size(" + n + ", i); }, [](int i) { return fk_ptr(" + n +
                 ", i); }},\n";
        }
        w += "};\nextern \"C\" __attribute__((visibility(\"default\"))) int wrnc_fake_count() { return " + std::to_string(names.size()) +
             "; }\nextern \"C\" __attribute__((visibility(\"default\"))) FkEntry* wrnc_fake_entries() { return FK; }\n";
        const std::string tmp = dir + "/" + id + "." + std::to_string(getpid());
        if (!write_file(dir + "/" + id + ".cu", src) || !write_file(tmp + ".wrap.cpp", w)) {
            err = "cannot write in " + dir;
            return nullptr;
        }
        const std::string cmd = cxx() + CXX_FLAGS + " -shared -I '" + pch_dir(dir) +
                                "' -I '" WRNC_FAKE_EMU_DIR "' -I '" + dir + "' '" + tmp + ".wrap.cpp' -o '" + tmp +
                                ".so' 2> '" + tmp + ".log'";
        if (std::system(cmd.c_str()) != 0) {
            err = "g++ could not build the emulation of this module; see " + tmp + ".log";
            return nullptr;
        }
        if (std::rename((tmp + ".so").c_str(), so.c_str()) != 0) {
            err = "cannot rename " + tmp + ".so";
            return nullptr;
        }
        std::remove((tmp + ".wrap.cpp").c_str());
        std::remove((tmp + ".log").c_str());
    }
    void* h = dlopen(so.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) err = std::string("dlopen: ") + dlerror();
    return h;
}

struct NvrtcProg {
    std::string src, log;
    void* real = nullptr;  // the real NVRTC's program, when WRNC_FAKE_REAL_NVRTC is set
};

void* real_nvrtc() {
    static void* h = []() -> void* {
        const char* p = std::getenv("WRNC_FAKE_REAL_NVRTC");
        if (!p || !*p) return nullptr;
        // NVRTC finds its builtins library only when it is already loaded or on the loader's
        // path: load the one beside it first, as wrnc's own loader does.
        std::string dir(p);
        dir = dir.substr(0, dir.find_last_of('/') + 1);
        if (DIR* d = opendir(dir.empty() ? "." : dir.c_str())) {
            std::vector<std::string> found;
            while (dirent* e = readdir(d))
                if (std::strncmp(e->d_name, "libnvrtc-builtins.so", 20) == 0) found.push_back(e->d_name);
            closedir(d);
            std::sort(found.begin(), found.end());
            for (auto& f : found)
                if (dlopen((dir + f).c_str(), RTLD_NOW | RTLD_GLOBAL)) break;
        }
        void* lib = dlopen(p, RTLD_NOW | RTLD_LOCAL);
        if (!lib) std::fprintf(stderr, "fakecuda: cannot load WRNC_FAKE_REAL_NVRTC=%s: %s\n", p, dlerror());
        return lib;
    }();
    return h;
}

}  // namespace

#define API extern "C" __attribute__((visibility("default")))

// ---- driver: device and context ----

API CUresult cuInit(unsigned) { return OK; }
API CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return OK;
}
API CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return OK;
}
API CUresult cuDeviceGet(int* d, int ordinal) {
    if (ordinal != 0) return INVALID_DEVICE;
    *d = 0;
    return OK;
}
API CUresult cuDeviceGetName(char* name, int len, int) {
    std::snprintf(name, len, "wrnc fake GPU (CPU emulation)");
    return OK;
}
API CUresult cuDeviceGetAttribute(int* v, int attr, int) {
    switch (attr) {
        case 8: *v = SMEM_DEFAULT; return OK;  // max shared memory per block
        case 97: *v = (int)smem_optin(); return OK;  // ... with the opt-in
        case 16: *v = 132; return OK;    // multiprocessors
        case 75: *v = 9; return OK;      // compute capability major
        case 76: *v = 0; return OK;      // minor
        default: *v = 0; return OK;
    }
}
API CUresult cuDeviceTotalMem_v2(std::size_t* b, int) {
    *b = total_mem();
    return OK;
}
API CUresult cuDevicePrimaryCtxRetain(void** ctx, int) {
    static int the_context;
    *ctx = &the_context;
    return OK;
}
API CUresult cuDevicePrimaryCtxRelease_v2(int) { return OK; }
API CUresult cuCtxSetCurrent(void*) { return OK; }
API CUresult cuCtxSynchronize() {
    std::lock_guard l(g_mu);
    if (any_capture) return fail(CAPTURE_UNSUPPORTED, "cuCtxSynchronize during capture");
    g_legacy_pending = false;
    return g_sticky;
}

// ---- memory ----

// After a fault every call that touches the context returns it again, as on a GPU.
API CUresult cuMemGetInfo_v2(std::size_t* free, std::size_t* total) {
    std::lock_guard l(g_mu);
    if (g_sticky) return g_sticky;
    *total = total_mem();
    *free = *total - g_used;
    return OK;
}
API CUresult cuMemAlloc_v2(CUdeviceptr* p, std::size_t bytes) {
    std::lock_guard l(g_mu);
    if (any_capture) return fail(CAPTURE_UNSUPPORTED, "cuMemAlloc during capture");
    if (g_sticky) return g_sticky;
    if (bytes == 0) return INVALID_VALUE;
    if (g_used + bytes > total_mem()) return fail(OUT_OF_MEMORY, "cuMemAlloc");
    auto* base = (unsigned char*)std::aligned_alloc(256, ((bytes + 2 * GUARD) + 255) / 256 * 256);
    if (!base) return OUT_OF_MEMORY;
    std::memset(base, GUARD_BYTE, GUARD);
    std::memset(base + GUARD, 0xff, bytes);
    std::memset(base + GUARD + bytes, GUARD_BYTE, GUARD);
    *p = (CUdeviceptr)(std::uintptr_t)(base + GUARD);
    g_allocs[*p] = Alloc{base, bytes};
    g_used += bytes;
    return OK;
}
API CUresult cuMemFree_v2(CUdeviceptr p) {
    std::lock_guard l(g_mu);
    auto it = g_allocs.find(p);
    if (it == g_allocs.end()) return fail(INVALID_VALUE, "cuMemFree of an unknown pointer");
    g_used -= it->second.bytes;
    std::free(it->second.base);
    g_allocs.erase(it);
    return OK;
}

static CUresult copy_check(CUdeviceptr p, std::size_t n, const char* what) {
    if (any_capture) return fail(CAPTURE_UNSUPPORTED, what);
    if (g_sticky) return g_sticky;
    if (!find(p, n)) {
        std::fprintf(stderr, "fakecuda: %s of %zu bytes at 0x%llx is outside every allocation\n", what, n, p);
        return INVALID_VALUE;
    }
    return OK;
}
API CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* h, std::size_t n) {
    std::lock_guard l(g_mu);
    if (CUresult r = copy_check(d, n, "cuMemcpyHtoD")) return r;
    std::memcpy((void*)(std::uintptr_t)d, h, n);
    g_legacy_pending = true;
    return OK;
}
API CUresult cuMemcpyDtoH_v2(void* h, CUdeviceptr d, std::size_t n) {
    std::lock_guard l(g_mu);
    if (CUresult r = copy_check(d, n, "cuMemcpyDtoH")) return r;
    std::memcpy(h, (void*)(std::uintptr_t)d, n);
    g_legacy_pending = false;
    return OK;
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, std::size_t n) {
    std::lock_guard l(g_mu);
    if (CUresult r = copy_check(d, n, "cuMemcpyDtoD (destination)")) return r;
    if (CUresult r = copy_check(s, n, "cuMemcpyDtoD (source)")) return r;
    std::memmove((void*)(std::uintptr_t)d, (void*)(std::uintptr_t)s, n);
    g_legacy_pending = true;
    return OK;
}
API CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, std::size_t n) {
    std::lock_guard l(g_mu);
    if (CUresult r = copy_check(d, n, "cuMemsetD8")) return r;
    std::memset((void*)(std::uintptr_t)d, v, n);
    g_legacy_pending = true;
    return OK;
}
// The stream-ordered forms (what wrnc uses): performed at once, in order with the stream's
// launches (the emulation runs everything in issue order); from pageable host memory the
// real driver stages the bytes before it returns, so the host buffer may go at once.
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* h, std::size_t n, void* stream) {
    std::lock_guard l(g_mu);
    if (CUresult r = copy_check(d, n, "cuMemcpyHtoDAsync")) return r;
    if (CUresult r = legacy_order_check(stream, "cuMemcpyHtoDAsync")) return r;
    std::memcpy((void*)(std::uintptr_t)d, h, n);
    return OK;
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, std::size_t n, void* stream) {
    std::lock_guard l(g_mu);
    if (CUresult r = copy_check(d, n, "cuMemcpyDtoDAsync (destination)")) return r;
    if (CUresult r = copy_check(s, n, "cuMemcpyDtoDAsync (source)")) return r;
    if (CUresult r = legacy_order_check(stream, "cuMemcpyDtoDAsync")) return r;
    std::memmove((void*)(std::uintptr_t)d, (void*)(std::uintptr_t)s, n);
    return OK;
}
API CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, std::size_t n, void* stream) {
    std::lock_guard l(g_mu);
    if (CUresult r = copy_check(d, n, "cuMemsetD8Async")) return r;
    if (CUresult r = legacy_order_check(stream, "cuMemsetD8Async")) return r;
    std::memset((void*)(std::uintptr_t)d, v, n);
    return OK;
}

// ---- modules and launches ----

// The emulation's tensor map (emu/cuda_emu_tma.h), with what the real driver requires of the
// arguments wrnc passes; the tensor must also lie inside one live allocation (the real driver
// does not check that, but a TMA copy outside it would fault).
API CUresult cuTensorMapEncodeTiled(void* map, int dtype, unsigned rank, void* addr, const std::uint64_t* dims,
                                    const std::uint64_t* strides, const unsigned* box, const unsigned* elem_strides,
                                    int interleave, int swizzle, int l2, int oob) {
    std::lock_guard l(g_mu);
    if (!map || reinterpret_cast<std::uintptr_t>(map) % 64 != 0)
        return fail(INVALID_VALUE, "cuTensorMapEncodeTiled: tensor map not 64-byte aligned");
    unsigned elem = 0;
    switch (dtype) {
        case 1: case 6: case 9: elem = 2; break;  // UINT16, FLOAT16, BFLOAT16
        case 7: elem = 4; break;                  // FLOAT32
        default: return fail(INVALID_VALUE, "cuTensorMapEncodeTiled: data type");
    }
    if (interleave != 0 || oob != 0 || l2 < 0 || l2 > 3)
        return fail(INVALID_VALUE, "cuTensorMapEncodeTiled: only interleave and oob-fill none are emulated");
    if (swizzle < 0 || swizzle > 3)  // CU_TENSOR_MAP_SWIZZLE_NONE, _32B, _64B, _128B
        return fail(INVALID_VALUE, "cuTensorMapEncodeTiled: swizzle mode");
    for (unsigned i = 0; i < rank && i < 5; ++i)
        if (elem_strides[i] != 1) return fail(INVALID_VALUE, "cuTensorMapEncodeTiled: element strides other than 1");
    wrnc_tmap t;
    if (const char* e = wrnc_emu_tma::encode(&t, addr, rank, elem, dims, strides, box,
                                             swizzle == 0 ? 0u : 16u << swizzle)) {
        std::fprintf(stderr, "fakecuda: cuTensorMapEncodeTiled: %s\n", e);
        return INVALID_VALUE;
    }
    const std::uint64_t begin = t.w[1], end = wrnc_emu_tma::extent(t);
    if (!find((CUdeviceptr)begin, end - begin))
        return fail(INVALID_VALUE, "cuTensorMapEncodeTiled: the tensor is not inside one allocation");
    std::memcpy(map, &t, sizeof t);
    return OK;
}

API CUresult cuModuleLoadDataEx(void** mod, const void* image, unsigned nopt, int* opts, void** vals) {
    std::lock_guard l(g_mu);
    if (g_sticky) return g_sticky;
    const char* text = (const char*)image;
    if (std::strncmp(text, "\x7f" "ELF", 4) == 0) text += 64;
    const std::size_t ml = std::strlen(MARKER);
    if (std::strncmp(text, MARKER, ml) != 0) {
        set_log("this image is not from the fake NVRTC (set WRNC_NVRTC to the fake library too)", nopt, opts, vals);
        return INVALID_IMAGE;
    }
    std::string src(text + ml), err;
    void* so = load_so(src, err);
    if (!so) {
        set_log(err, nopt, opts, vals);
        return INVALID_IMAGE;
    }
    struct FkEntry {
        const char* name;
        Launch launch;
        int argc;
        unsigned long (*size)(int);
        int (*ptr)(int);
    };
    auto count = (int (*)())dlsym(so, "wrnc_fake_count");
    auto entries = (FkEntry * (*)()) dlsym(so, "wrnc_fake_entries");
    if (!count || !entries) {
        set_log("the emulation module lacks its entry table", nopt, opts, vals);
        return INVALID_IMAGE;
    }
    auto* m = new Module{so, {}};
    FkEntry* e = entries();
    for (int i = 0; i < count(); ++i) {
        auto* k = new Kernel{e[i].name, e[i].launch, SMEM_DEFAULT, {}, {}};
        for (int a = 0; a < e[i].argc; ++a) {
            k->arg_size.push_back(e[i].size(a));
            k->arg_ptr.push_back(e[i].ptr(a) != 0);
        }
        m->kernels[k->name] = k;
    }
    *mod = m;
    return OK;
}
API CUresult cuModuleGetFunction(void** f, void* mod, const char* name) {
    std::lock_guard l(g_mu);
    auto* m = (Module*)mod;
    auto it = m->kernels.find(name);
    if (it == m->kernels.end()) return fail(NOT_FOUND, "cuModuleGetFunction");
    *f = it->second;
    return OK;
}
// CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES (8) only; the emulation's kernels declare
// their static shared memory as host statics, so SHARED_SIZE_BYTES (1) reads 0.
API CUresult cuFuncSetAttribute(void* f, int attr, int v) {
    std::lock_guard l(g_mu);
    auto* k = (Kernel*)f;
    if (!k || attr != 8 || v < 0 || (unsigned)v > smem_optin()) return fail(INVALID_VALUE, "cuFuncSetAttribute");
    k->max_dynamic = (unsigned)v;
    return OK;
}
API CUresult cuFuncGetAttribute(int* v, int attr, void* f) {
    if (!f || !v) return INVALID_VALUE;
    switch (attr) {
        case 1: *v = 0; return OK;                            // static shared memory
        case 8: *v = (int)((Kernel*)f)->max_dynamic; return OK;
        default: return fail(INVALID_VALUE, "cuFuncGetAttribute");
    }
}
API CUresult cuModuleUnload(void* mod) {
    std::lock_guard l(g_mu);
    auto* m = (Module*)mod;
    for (auto& [n, k] : m->kernels) delete k;
    // the shared object stays loaded: graphs recorded from it may outlive the module handle
    delete m;
    return OK;
}
API CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                            unsigned bz, unsigned shared, void* stream, void** params, void** extra) {
    std::lock_guard l(g_mu);
    auto* k = (Kernel*)f;
    if (!k || !params || extra) return fail(INVALID_VALUE, "cuLaunchKernel arguments");
    if (shared > k->max_dynamic)
        return fail(INVALID_VALUE, "cuLaunchKernel: more dynamic shared memory than the kernel's limit");
    if (gx * gy * gz == 0 || bx * by * bz == 0 || bx * by * bz > 1024)
        return fail(INVALID_VALUE, "cuLaunchKernel launch dimensions");
    const unsigned g[3] = {gx, gy, gz}, b[3] = {bx, by, bz};
    if (CUresult r = legacy_order_check(stream, "cuLaunchKernel")) return r;
    auto* s = (Stream*)stream;
    if (s && s->capture) {
        Recorded r{k, {gx, gy, gz}, {bx, by, bz}, shared, {}};
        for (std::size_t i = 0; i < k->arg_size.size(); ++i) {
            auto* p = (unsigned char*)params[i];
            r.args.emplace_back(p, p + k->arg_size[i]);
        }
        s->capture->launches.push_back(std::move(r));
        return OK;
    }
    ++g_stats.stream_kernels;
    return run_launch(k, g, b, shared, params);
}

// ---- streams, events, graphs ----

API CUresult cuStreamCreate(void** s, unsigned flags) {
    auto* st = new Stream;
    st->non_blocking = (flags & 1u) != 0;  // CU_STREAM_NON_BLOCKING
    *s = st;
    return OK;
}
API CUresult cuStreamDestroy_v2(void* s) {
    delete (Stream*)s;
    return OK;
}
API CUresult cuStreamSynchronize(void* s) {
    std::lock_guard l(g_mu);
    if (s && ((Stream*)s)->capture) return fail(CAPTURE_UNSUPPORTED, "cuStreamSynchronize during capture");
    if (!s) g_legacy_pending = false;
    return g_sticky;
}
API CUresult cuEventCreate(void** e, unsigned) {
    *e = new Event;
    return OK;
}
API CUresult cuEventRecord(void* e, void* s) {
    std::lock_guard l(g_mu);
    if (s && ((Stream*)s)->capture) return fail(CAPTURE_UNSUPPORTED, "cuEventRecord of a timing event during capture");
    ((Event*)e)->t = std::chrono::steady_clock::now();
    ((Event*)e)->recorded = true;
    return g_sticky;
}
API CUresult cuEventSynchronize(void* e) { return ((Event*)e)->recorded ? g_sticky : INVALID_HANDLE; }
API CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) {
    auto *x = (Event*)a, *y = (Event*)b;
    if (!x->recorded || !y->recorded) return INVALID_HANDLE;
    *ms = std::chrono::duration<float, std::milli>(y->t - x->t).count();
    return OK;
}
API CUresult cuEventDestroy_v2(void* e) {
    delete (Event*)e;
    return OK;
}
API CUresult cuStreamBeginCapture_v2(void* s, int) {
    std::lock_guard l(g_mu);
    auto* st = (Stream*)s;
    if (!st || st->capture) return INVALID_VALUE;
    st->capture = new Graph;
    any_capture = true;
    return OK;
}
API CUresult cuStreamEndCapture(void* s, void** graph) {
    std::lock_guard l(g_mu);
    auto* st = (Stream*)s;
    if (!st || !st->capture) return INVALID_VALUE;
    *graph = st->capture;
    st->capture = nullptr;
    any_capture = false;
    ++g_stats.captures;
    return OK;
}
API CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
    *exec = new Graph(*(Graph*)graph);
    return OK;
}
API CUresult cuGraphLaunch(void* exec, void* stream) {
    std::lock_guard l(g_mu);
    if (stream && ((Stream*)stream)->capture) return fail(CAPTURE_INVALIDATED, "cuGraphLaunch during capture");
    if (CUresult r = legacy_order_check(stream, "cuGraphLaunch")) return r;
    ++g_stats.graph_launches;
    g_stats.graph_kernels += ((Graph*)exec)->launches.size();
    for (auto& r : ((Graph*)exec)->launches) {
        std::vector<void*> ptrs;
        for (auto& a : r.args) ptrs.push_back(a.data());
        if (CUresult e = run_launch(r.k, r.g, r.b, r.shared, ptrs.data())) return e;
    }
    return OK;
}
API CUresult cuGraphExecDestroy(void* g) {
    delete (Graph*)g;
    return OK;
}
API CUresult cuGraphDestroy(void* g) {
    delete (Graph*)g;
    return OK;
}
API CUresult cuGetErrorName(CUresult r, const char** s) {
    switch (r) {
        case OK: *s = "CUDA_SUCCESS"; break;
        case INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; break;
        case OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case INVALID_DEVICE: *s = "CUDA_ERROR_INVALID_DEVICE"; break;
        case INVALID_IMAGE: *s = "CUDA_ERROR_INVALID_IMAGE"; break;
        case INVALID_HANDLE: *s = "CUDA_ERROR_INVALID_HANDLE"; break;
        case NOT_FOUND: *s = "CUDA_ERROR_NOT_FOUND"; break;
        case ILLEGAL_ADDRESS: *s = "CUDA_ERROR_ILLEGAL_ADDRESS"; break;
        case CAPTURE_UNSUPPORTED: *s = "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"; break;
        case CAPTURE_INVALIDATED: *s = "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"; break;
        default: return INVALID_VALUE;
    }
    return OK;
}
API CUresult cuGetErrorString(CUresult r, const char** s) {
    if (cuGetErrorName(r, s) != OK) return INVALID_VALUE;
    if (r == ILLEGAL_ADDRESS) *s = "an illegal memory access was encountered (fake driver)";
    return OK;
}

// ---- NVRTC ----

API int nvrtcVersion(int* major, int* minor) {
    *major = 13;
    *minor = 0;
    return 0;
}
API int nvrtcCreateProgram(void** prog, const char* src, const char* name, int nh, const char* const* h,
                           const char* const* hn) {
    auto* p = new NvrtcProg{src, "", nullptr};
    if (void* real = real_nvrtc()) {
        auto create = (int (*)(void**, const char*, const char*, int, const char* const*,
                               const char* const*))dlsym(real, "nvrtcCreateProgram");
        if (create && create(&p->real, src, name, nh, h, hn) != 0) p->real = nullptr;
    }
    *prog = p;
    return 0;
}
API int nvrtcCompileProgram(void* prog, int n, const char* const* opts) {
    auto* p = (NvrtcProg*)prog;
    if (p->real) {
        void* real = real_nvrtc();
        auto compile = (int (*)(void*, int, const char* const*))dlsym(real, "nvrtcCompileProgram");
        auto log_size = (int (*)(void*, std::size_t*))dlsym(real, "nvrtcGetProgramLogSize");
        auto log = (int (*)(void*, char*))dlsym(real, "nvrtcGetProgramLog");
        // a real architecture checked as its virtual one: the PTX, not ptxas
        std::vector<std::string> own(opts, opts + n);
        std::vector<const char*> ptrs;
        for (auto& o : own) {
            const std::string real_arch = "--gpu-architecture=sm_";
            if (o.compare(0, real_arch.size(), real_arch) == 0)
                o = "--gpu-architecture=compute_" + o.substr(real_arch.size());
            ptrs.push_back(o.c_str());
        }
        int r = compile(p->real, n, ptrs.data());
        if (r != 0) {
            std::size_t len = 0;
            log_size(p->real, &len);
            p->log.assign(len, '\0');
            log(p->real, p->log.data());
            return r;
        }
    }
    return 0;
}
API int nvrtcGetProgramLogSize(void* prog, std::size_t* n) {
    *n = ((NvrtcProg*)prog)->log.size() + 1;
    return 0;
}
API int nvrtcGetProgramLog(void* prog, char* out) {
    auto& l = ((NvrtcProg*)prog)->log;
    std::memcpy(out, l.c_str(), l.size() + 1);
    return 0;
}
API int nvrtcGetPTXSize(void* prog, std::size_t* n) {
    *n = std::strlen(MARKER) + ((NvrtcProg*)prog)->src.size() + 1;
    return 0;
}
API int nvrtcGetPTX(void* prog, char* out) {
    std::string s = std::string(MARKER) + ((NvrtcProg*)prog)->src;
    std::memcpy(out, s.c_str(), s.size() + 1);
    return 0;
}
API int nvrtcGetCUBINSize(void* prog, std::size_t* n) {
    *n = 64 + std::strlen(MARKER) + ((NvrtcProg*)prog)->src.size() + 1;
    return 0;
}
API int nvrtcGetCUBIN(void* prog, char* out) {
    std::string s = elf_header() + MARKER + ((NvrtcProg*)prog)->src;
    std::memcpy(out, s.data(), s.size() + 1);
    return 0;
}
API int nvrtcDestroyProgram(void** prog) {
    auto* p = (NvrtcProg*)*prog;
    if (p && p->real) {
        auto destroy = (int (*)(void**))dlsym(real_nvrtc(), "nvrtcDestroyProgram");
        if (destroy) destroy(&p->real);
    }
    delete p;
    *prog = nullptr;
    return 0;
}
API const char* nvrtcGetErrorString(int r) { return r == 0 ? "NVRTC_SUCCESS" : "NVRTC_ERROR (fake: see the log)"; }
