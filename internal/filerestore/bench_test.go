package filerestore

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/backup"
	"github.com/vmshadow/vmshadow/internal/fsproto"
	"github.com/vmshadow/vmshadow/internal/imagefile"
	"github.com/vmshadow/vmshadow/internal/instant"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/repo/backend/local"
	"github.com/vmshadow/vmshadow/internal/restore"
)

// BenchmarkFilesLsRoot measures what `vmshadow files ls BACKUP vda1:/`
// does, from a cold cache: boot the helper VM (TCG) with a backed-up 2 GiB
// disk (GPT, a 2 GiB ext4 holding a few thousand files) attached over NBD,
// mount the file system and list its root with every entry's metadata.
// It reports the helper's boot time and the bytes read from the
// repository (default 4 MiB chunks, AES-GCM encryption).
func BenchmarkFilesLsRoot(b *testing.B) {
	h := BuildHelperForTest(b)
	ctx := context.Background()
	dir := b.TempDir()
	files := TestTree(11)
	for i := 0; i < 3000; i++ {
		files = append(files, TestFile{Path: fmt.Sprintf("etc/nginx/site%04d.conf", i), Data: []byte(fmt.Sprintf("server %d;\n", i)), Mode: 0o644, Time: time.Unix(1.7e9, 0)})
	}
	for _, d := range []string{"bin", "boot", "dev", "lib", "mnt", "opt", "proc", "root", "run", "sbin", "srv", "sys", "tmp", "usr", "var"} {
		files = append(files, TestFile{Path: d, Type: "dir", Mode: 0o755, Time: time.Unix(1.7e9, 0)})
	}
	img := filepath.Join(dir, "disk.img")
	MakeTestDisk(b, img, "gpt", []TestPart{{SizeMiB: 2048, FSType: "ext4", Files: files}})
	be, err := local.Create(filepath.Join(dir, "repo"))
	if err != nil {
		b.Fatal(err)
	}
	r, err := repo.Init(ctx, be, repo.InitOptions{Password: []byte("bench"), Encryption: repo.EncryptionAESGCM})
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	im, err := imagefile.Open("vda", img)
	if err != nil {
		b.Fatal(err)
	}
	res, err := backup.Run(ctx, r, backup.Job{VM: "bench", Disks: []backup.Disk{{Source: im}}}, backup.Options{})
	im.Close()
	if err != nil {
		b.Fatal(err)
	}
	m, err := r.LoadManifest(ctx, res.ID)
	if err != nil {
		b.Fatal(err)
	}
	x, err := restore.LoadIndex(ctx, r, m.Disks[0])
	if err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	var boot time.Duration
	var read, chunks int64
	for i := 0; i < b.N; i++ {
		d := instant.NewDisk(r, x, 64<<20)
		s, err := Start(ctx, []Disk{{Name: "vda", Export: d}}, Options{Helper: h})
		if err != nil {
			b.Fatal(err)
		}
		f, err := s.Find("vda1")
		if err != nil {
			b.Fatal(err)
		}
		n := 0
		if err := s.List(ctx, f, "/", func(fsproto.Entry) error { n++; return nil }); err != nil {
			b.Fatal(err)
		}
		if n != 18 {
			b.Fatalf("listed %d entries in /, want 18", n)
		}
		boot += s.Boot
		c, by := d.Fetched()
		chunks, read = chunks+c, read+by
		b.StopTimer()
		s.Close()
		b.StartTimer()
	}
	b.ReportMetric(boot.Seconds()/float64(b.N), "boot-s/op")
	b.ReportMetric(float64(read)/float64(b.N), "repo-bytes/op")
	b.ReportMetric(float64(chunks)/float64(b.N), "chunks/op")
}
