package qcow2

import (
	"encoding/binary"
	"fmt"
	"io"
)

// layout is what checkLayout found in an image.
type layout struct {
	clusterSize  int64
	fileClusters int64
	dataClusters int64 // guest data clusters allocated
	l2Tables     int64
}

// checkLayout verifies an image written by Writer against the spec and
// against the Writer's promises, reading the file from scratch: a version 3
// header with 16-bit refcounts and no feature bits; the file a whole number
// of clusters; every L1/L2/refcount-table entry aligned with reserved bits
// clear and the COPIED flag set; every cluster of the file referenced exactly
// once (header, L1, L2 tables, data, refcount table and blocks) and its
// refcount exactly that (no leaks, no overlaps, no unreferenced space).
// It is the fuzz test's stand-in for 'qemu-img check'.
func checkLayout(f io.ReaderAt, fileSize int64) (layout, error) {
	var lay layout
	hb := make([]byte, min(fileSize, headerLenV3+8))
	if _, err := f.ReadAt(hb, 0); err != nil {
		return lay, fmt.Errorf("read header: %v", err)
	}
	h, err := parseHeader(hb)
	if err != nil {
		return lay, err
	}
	if h.version != 3 || h.refcountOrder != 4 || h.headerLength != headerLenV3 ||
		h.incompatible|h.compatible|h.autoclear != 0 || h.backingFileOffset != 0 || h.nbSnapshots != 0 {
		return lay, fmt.Errorf("unexpected header %+v", h)
	}
	if binary.BigEndian.Uint64(hb[headerLenV3:]) != 0 {
		return lay, fmt.Errorf("header extension area does not start with the end marker")
	}
	cs := int64(1) << h.clusterBits
	lay.clusterSize = cs
	if fileSize%cs != 0 {
		return lay, fmt.Errorf("file size %d is not a multiple of the cluster size %d", fileSize, cs)
	}
	lay.fileClusters = fileSize / cs
	refs := make([]int, lay.fileClusters)
	ref := func(what string, off, n int64) error {
		if off%cs != 0 || off <= 0 && what != "header" || off+n*cs > fileSize {
			return fmt.Errorf("%s at %#x (%d clusters) is misaligned or outside the %d-byte file", what, off, n, fileSize)
		}
		for i := off / cs; i < off/cs+n; i++ {
			refs[i]++
			if refs[i] > 1 {
				return fmt.Errorf("%s at %#x overlaps another structure in cluster %d", what, off, i)
			}
		}
		return nil
	}
	read := func(off, n int64) ([]byte, error) {
		b := make([]byte, n)
		_, err := f.ReadAt(b, off)
		return b, err
	}
	if err := ref("header", 0, 1); err != nil {
		return lay, err
	}
	l1Clusters := (int64(h.l1Size)*8 + cs - 1) / cs
	if want := l1Entries(h.size, uint(h.clusterBits)); uint64(h.l1Size) != want {
		return lay, fmt.Errorf("l1_size %d, want exactly %d", h.l1Size, want)
	}
	if l1Clusters == 0 && h.l1TableOffset != 0 {
		return lay, fmt.Errorf("empty L1 table at offset %#x, want 0", h.l1TableOffset)
	}
	if l1Clusters > 0 {
		if err := ref("L1 table", int64(h.l1TableOffset), l1Clusters); err != nil {
			return lay, err
		}
	}
	l1, err := read(int64(h.l1TableOffset), l1Clusters*cs)
	if err != nil {
		return lay, fmt.Errorf("read L1: %v", err)
	}
	for i := int64(0); i < l1Clusters*cs/8; i++ {
		e := binary.BigEndian.Uint64(l1[i*8:])
		if e == 0 {
			continue
		}
		if i >= int64(h.l1Size) || e&^(offsetMask|flagCopied) != 0 || e&flagCopied == 0 {
			return lay, fmt.Errorf("L1 entry %d = %#x: beyond l1_size, reserved bits or COPIED missing", i, e)
		}
		l2off := int64(e & offsetMask)
		if err := ref(fmt.Sprintf("L2 table %d", i), l2off, 1); err != nil {
			return lay, err
		}
		lay.l2Tables++
		l2, err := read(l2off, cs)
		if err != nil {
			return lay, fmt.Errorf("read L2 %d: %v", i, err)
		}
		empty := true
		for j := int64(0); j < cs/8; j++ {
			e := binary.BigEndian.Uint64(l2[j*8:])
			if e == 0 {
				continue
			}
			empty = false
			guest := (i*(cs/8) + j) * cs
			if guest >= int64(h.size) || e&^(offsetMask|flagCopied) != 0 || e&flagCopied == 0 {
				return lay, fmt.Errorf("L2 entry for guest offset %d = %#x: beyond the virtual size, reserved bits or COPIED missing", guest, e)
			}
			if err := ref(fmt.Sprintf("data cluster for guest offset %d", guest), int64(e&offsetMask), 1); err != nil {
				return lay, err
			}
			lay.dataClusters++
		}
		if empty {
			return lay, fmt.Errorf("L2 table %d maps nothing; it should not have been allocated", i)
		}
	}
	if err := ref("refcount table", int64(h.refcountTableOffset), int64(h.refcountTableClusters)); err != nil {
		return lay, err
	}
	rt, err := read(int64(h.refcountTableOffset), int64(h.refcountTableClusters)*cs)
	if err != nil {
		return lay, fmt.Errorf("read refcount table: %v", err)
	}
	perBlock := cs / 2
	refcounts := make([]int, lay.fileClusters)
	for i := int64(0); i < int64(len(rt))/8; i++ {
		e := binary.BigEndian.Uint64(rt[i*8:])
		if e == 0 {
			continue
		}
		if err := ref(fmt.Sprintf("refcount block %d", i), int64(e), 1); err != nil {
			return lay, err
		}
		rb, err := read(int64(e), cs)
		if err != nil {
			return lay, fmt.Errorf("read refcount block %d: %v", i, err)
		}
		for j := int64(0); j < perBlock; j++ {
			c := i*perBlock + j
			v := int(binary.BigEndian.Uint16(rb[j*2:]))
			if c >= lay.fileClusters {
				if v != 0 {
					return lay, fmt.Errorf("cluster %d beyond the end of the file has refcount %d", c, v)
				}
				continue
			}
			refcounts[c] = v
		}
	}
	for c := range refs {
		if refs[c] != refcounts[c] {
			return lay, fmt.Errorf("cluster %d: referenced %d times, refcount %d", c, refs[c], refcounts[c])
		}
		if refs[c] == 0 {
			return lay, fmt.Errorf("cluster %d is unused space inside the file", c)
		}
	}
	return lay, nil
}
