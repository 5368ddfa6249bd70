package predict

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
)

// glibc's /etc/ld.so.cache (elf/dl-cache.h, sysdeps/generic/ldconfig.h).
// The current format is "glibc-ld.so.cache1.1": a 48-byte header, nlibs
// 24-byte entries (flags, key, value, osversion, hwcap) and the strings,
// offsets counted from the header. Caches written for old loaders start
// with an "ld.so-1.7.0" table (12-byte entries) and carry the new format
// after it, 8-byte aligned; a cache with only the old table has its
// strings after the entries.
const (
	cacheMagicNew = "glibc-ld.so.cache1.1"
	cacheMagicOld = "ld.so-1.7.0"

	cacheTypeMask   = 0x00ff
	cacheELFLibc6   = 0x0003
	cacheELF        = 0x0001
	cacheArchMask   = 0xff00
	maxCacheEntries = 1 << 16
)

// cacheArch is the FLAG_*_LIB* value ldconfig records for libraries of a
// machine and class; -1 where any is accepted.
func cacheArch(machine elf.Machine, class elf.Class) int {
	is64 := class == elf.ELFCLASS64
	switch {
	case machine == elf.EM_X86_64 && is64:
		return 0x0300
	case machine == elf.EM_X86_64:
		return 0x0800 // x32
	case machine == elf.EM_AARCH64:
		return 0x0a00
	case machine == elf.EM_PPC64:
		return 0x0500
	case machine == elf.EM_S390 && is64:
		return 0x0400
	case machine == elf.EM_386, machine == elf.EM_S390, machine == elf.EM_PPC:
		return 0
	}
	return -1
}

type cacheEntry struct {
	flags int32
	path  string
	hwcap uint64
}

// ldCache maps a library name to the entries ldconfig recorded for it,
// in file order.
type ldCache map[string][]cacheEntry

// lookup returns the path the loader takes for name: the first entry of
// the right kind and architecture, preferring one outside glibc-hwcaps
// subdirectories (which depend on the CPU).
func (c ldCache) lookup(name string, machine elf.Machine, class elf.Class) string {
	arch := cacheArch(machine, class)
	var best string
	for _, e := range c[name] {
		if t := e.flags & cacheTypeMask; t != cacheELFLibc6 && t != cacheELF {
			continue
		}
		if arch >= 0 && int(e.flags&cacheArchMask) != arch {
			continue
		}
		if e.hwcap == 0 {
			return e.path
		}
		if best == "" {
			best = e.path
		}
	}
	return best
}

var errCache = errors.New("not an ld.so.cache")

func parseLDCache(b []byte) (ldCache, error) {
	if bytes.HasPrefix(b, []byte(cacheMagicNew)) {
		return parseCacheNew(b)
	}
	if !bytes.HasPrefix(b, []byte(cacheMagicOld)) || len(b) < 16 {
		return nil, errCache
	}
	n := int(binary.LittleEndian.Uint32(b[12:]))
	if n < 0 || n > maxCacheEntries || 16+n*12 > len(b) {
		return nil, errCache
	}
	end := 16 + n*12
	if off := (end + 7) &^ 7; off < len(b) && bytes.HasPrefix(b[off:], []byte(cacheMagicNew)) {
		return parseCacheNew(b[off:])
	}
	strs := b[end:]
	c := ldCache{}
	for i := 0; i < n; i++ {
		e := b[16+i*12:]
		key, ok1 := cString(strs, binary.LittleEndian.Uint32(e[4:]))
		val, ok2 := cString(strs, binary.LittleEndian.Uint32(e[8:]))
		if ok1 && ok2 {
			c[key] = append(c[key], cacheEntry{flags: int32(binary.LittleEndian.Uint32(e)), path: val})
		}
	}
	return c, nil
}

func parseCacheNew(b []byte) (ldCache, error) {
	const hdr, ent = 48, 24
	if len(b) < hdr {
		return nil, errCache
	}
	var order binary.ByteOrder = binary.LittleEndian
	if b[28]&3 == 3 { // cache_file_new_flags_endian_big
		order = binary.BigEndian
	}
	n := int(order.Uint32(b[20:]))
	if n < 0 || n > maxCacheEntries || hdr+n*ent > len(b) {
		return nil, errCache
	}
	c := ldCache{}
	for i := 0; i < n; i++ {
		e := b[hdr+i*ent:]
		key, ok1 := cString(b, order.Uint32(e[4:]))
		val, ok2 := cString(b, order.Uint32(e[8:]))
		if ok1 && ok2 {
			c[key] = append(c[key], cacheEntry{flags: int32(order.Uint32(e)), path: val, hwcap: order.Uint64(e[16:])})
		}
	}
	return c, nil
}

// cString returns the NUL-terminated string at off of b.
func cString(b []byte, off uint32) (string, bool) {
	if int64(off) >= int64(len(b)) {
		return "", false
	}
	s := b[off:]
	i := bytes.IndexByte(s, 0)
	if i <= 0 || i > maxPathLen {
		return "", false
	}
	return string(s[:i]), true
}
