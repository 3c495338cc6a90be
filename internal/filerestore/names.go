package filerestore

import (
	"fmt"
	"strings"

	"github.com/vmshadow/vmshadow/internal/errs"
)

// ParseLocation splits a location of the command line into a file
// system's name and an absolute path in it:
//
//	vda2:/etc/nginx     partition 2 of disk vda
//	vda:/etc            a file system on the whole disk vda
//	lvm:vg0/root:/etc   logical volume root of volume group vg0
//	/etc/nginx          the only file system of the backup
//
// An empty path means the root.
func ParseLocation(s string) (fsName, p string, err error) {
	rest := s
	if strings.HasPrefix(s, "lvm:") {
		vglv, after, ok := strings.Cut(s[len("lvm:"):], ":")
		if !ok || strings.Count(vglv, "/") != 1 || strings.HasPrefix(vglv, "/") || strings.HasSuffix(vglv, "/") {
			return "", "", fmt.Errorf("%q: a logical volume is named lvm:VG/LV:/path (as in lvm:vg0/root:/etc): %w", s, errs.ErrUsage)
		}
		fsName, rest = "lvm:"+vglv, after
	} else if !strings.HasPrefix(s, "/") {
		name, after, ok := strings.Cut(s, ":")
		if !ok || name == "" || strings.Contains(name, "/") {
			return "", "", fmt.Errorf("%q: name a path as FS:/path (vda2:/etc, vda:/etc for a whole disk, lvm:vg0/root:/etc) or /path when the backup has one file system: %w", s, errs.ErrUsage)
		}
		fsName, rest = name, after
	}
	if rest == "" {
		rest = "/"
	}
	if !strings.HasPrefix(rest, "/") {
		return "", "", fmt.Errorf("%q: the path %q must be absolute (start with /): %w", s, rest, errs.ErrUsage)
	}
	if strings.ContainsRune(rest, 0) {
		return "", "", fmt.Errorf("%q: NUL in the path: %w", s, errs.ErrUsage)
	}
	return fsName, rest, nil
}
