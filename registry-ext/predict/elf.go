package predict

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"errors"
	"strings"
)

// ELF bounds: what a loader could need of a sane binary, far below what a
// hostile one may claim.
const (
	maxPhnum     = 512      // program headers
	maxInterp    = 4096     // PT_INTERP
	maxDynamic   = 64 << 10 // PT_DYNAMIC bytes
	maxNeeded    = 512      // DT_NEEDED entries of one object
	maxDynString = 4096     // one string of the dynamic string table
)

var errNotELF = errors.New("not an ELF file")

// elfInfo is what the kernel and the dynamic loader read of an ELF file
// before the program runs: its class and machine (a library must match
// the program's), the interpreter (PT_INTERP) and the dynamic section's
// DT_NEEDED, DT_RPATH, DT_RUNPATH and DT_SONAME.
type elfInfo struct {
	class   elf.Class
	machine elf.Machine
	interp  string
	needed  []string
	rpath   string
	runpath string
	soname  string
	nodef   bool // DF_1_NODEFLIB: the default directories are not searched
}

func (i *elfInfo) compatible(o *elfInfo) bool {
	return i.class == o.class && i.machine == o.machine
}

// isELF reports whether head starts with the ELF magic.
func isELF(head []byte) bool {
	return bytes.HasPrefix(head, []byte(elf.ELFMAG))
}

// load is a PT_LOAD segment: file offset ↔ virtual address.
type load struct {
	off, vaddr, filesz uint64
}

// readELF parses the headers and the dynamic section of an ELF file with
// a few ranged reads (the section headers, at the end of the file, are
// never read): the ELF header, the program headers, PT_INTERP, PT_DYNAMIC
// and the strings it names.
func readELF(r *reader) (*elfInfo, error) {
	ident, err := r.readAt(0, 64)
	if err != nil {
		return nil, err
	}
	if len(ident) < elf.EI_NIDENT || !isELF(ident) {
		return nil, errNotELF
	}
	var order binary.ByteOrder
	switch elf.Data(ident[elf.EI_DATA]) {
	case elf.ELFDATA2LSB:
		order = binary.LittleEndian
	case elf.ELFDATA2MSB:
		order = binary.BigEndian
	default:
		return nil, errNotELF
	}
	info := &elfInfo{class: elf.Class(ident[elf.EI_CLASS])}
	var typ elf.Type
	var phoff uint64
	var phentsize, phnum, wantEnt int
	switch info.class {
	case elf.ELFCLASS64:
		var h elf.Header64
		if err := binary.Read(bytes.NewReader(ident), order, &h); err != nil {
			return nil, errNotELF
		}
		typ, info.machine = elf.Type(h.Type), elf.Machine(h.Machine)
		phoff, phentsize, phnum, wantEnt = h.Phoff, int(h.Phentsize), int(h.Phnum), binary.Size(elf.Prog64{})
	case elf.ELFCLASS32:
		var h elf.Header32
		if err := binary.Read(bytes.NewReader(ident), order, &h); err != nil {
			return nil, errNotELF
		}
		typ, info.machine = elf.Type(h.Type), elf.Machine(h.Machine)
		phoff, phentsize, phnum, wantEnt = uint64(h.Phoff), int(h.Phentsize), int(h.Phnum), binary.Size(elf.Prog32{})
	default:
		return nil, errNotELF
	}
	if typ != elf.ET_EXEC && typ != elf.ET_DYN {
		return nil, errNotELF
	}
	if phnum == 0 {
		return info, nil
	}
	if phentsize != wantEnt || phnum > maxPhnum || phoff > uint64(r.size()) {
		return nil, errNotELF
	}
	ph, err := r.readAt(int64(phoff), phnum*phentsize)
	if err != nil {
		return nil, err
	}
	if len(ph) < phnum*phentsize {
		return nil, errNotELF
	}
	var loads []load
	var dynOff, dynSize uint64
	var interpOff, interpSize uint64
	for i := 0; i < phnum; i++ {
		var p elf.Prog64
		b := bytes.NewReader(ph[i*phentsize : (i+1)*phentsize])
		if info.class == elf.ELFCLASS64 {
			if err := binary.Read(b, order, &p); err != nil {
				return nil, errNotELF
			}
		} else {
			var p32 elf.Prog32
			if err := binary.Read(b, order, &p32); err != nil {
				return nil, errNotELF
			}
			p = elf.Prog64{Type: p32.Type, Off: uint64(p32.Off), Vaddr: uint64(p32.Vaddr), Filesz: uint64(p32.Filesz)}
		}
		switch elf.ProgType(p.Type) {
		case elf.PT_LOAD:
			loads = append(loads, load{off: p.Off, vaddr: p.Vaddr, filesz: p.Filesz})
		case elf.PT_INTERP:
			interpOff, interpSize = p.Off, p.Filesz
		case elf.PT_DYNAMIC:
			dynOff, dynSize = p.Off, p.Filesz
		}
	}
	if interpSize > 0 && interpSize <= maxInterp && interpOff < uint64(r.size()) {
		b, err := r.readAt(int64(interpOff), int(interpSize))
		if err != nil {
			return nil, err
		}
		info.interp, _, _ = strings.Cut(string(b), "\x00")
	}
	if dynSize == 0 || dynOff >= uint64(r.size()) {
		return info, nil
	}
	dyn, err := r.readAt(int64(dynOff), int(min(dynSize, maxDynamic)))
	if err != nil {
		return nil, err
	}
	var strtab, strsz uint64
	var needed []uint64
	rpath, runpath, soname := ^uint64(0), ^uint64(0), ^uint64(0)
	entSize := 16
	if info.class == elf.ELFCLASS32 {
		entSize = 8
	}
	for i := 0; i+entSize <= len(dyn); i += entSize {
		var tag, val uint64
		if entSize == 16 {
			tag, val = order.Uint64(dyn[i:]), order.Uint64(dyn[i+8:])
		} else {
			tag, val = uint64(order.Uint32(dyn[i:])), uint64(order.Uint32(dyn[i+4:]))
		}
		switch elf.DynTag(tag) {
		case elf.DT_NULL:
			i = len(dyn)
		case elf.DT_NEEDED:
			if len(needed) < maxNeeded {
				needed = append(needed, val)
			}
		case elf.DT_RPATH:
			rpath = val
		case elf.DT_RUNPATH:
			runpath = val
		case elf.DT_SONAME:
			soname = val
		case elf.DT_STRTAB:
			strtab = val
		case elf.DT_STRSZ:
			strsz = val
		case elf.DT_FLAGS_1:
			info.nodef = elf.DynFlag1(val)&elf.DF_1_NODEFLIB != 0
		}
	}
	// DT_STRTAB is an address: find the segment that maps it.
	strOff, ok := uint64(0), false
	for _, l := range loads {
		if strtab >= l.vaddr && strtab-l.vaddr < l.filesz {
			strOff, ok = l.off+(strtab-l.vaddr), true
			break
		}
	}
	if !ok {
		return info, nil
	}
	str := func(off uint64) string {
		if off >= strsz {
			return ""
		}
		n := min(strsz-off, maxDynString)
		b, err := r.readAt(int64(strOff+off), int(n))
		if err != nil {
			return ""
		}
		s, _, found := strings.Cut(string(b), "\x00")
		if !found {
			return ""
		}
		return s
	}
	for _, off := range needed {
		if s := str(off); s != "" {
			info.needed = append(info.needed, s)
		}
	}
	if rpath != ^uint64(0) {
		info.rpath = str(rpath)
	}
	if runpath != ^uint64(0) {
		info.runpath = str(runpath)
	}
	if soname != ^uint64(0) {
		info.soname = str(soname)
	}
	return info, nil
}
