package qemu_test

import (
	"context"
	"fmt"
	"os"
	"testing"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/provider/qemu"
	"github.com/vmshadow/vmshadow/internal/qemutest"
	"github.com/vmshadow/vmshadow/internal/qga/qgatest"
	"github.com/vmshadow/vmshadow/internal/writer"
)

// BenchmarkFreezeWindow measures the freeze window of a snapshot set
// (first freeze to last thaw, freeze-ms/op) of one running VM and of a
// group of three taken at one instant, where the window also holds the
// pause of every VM around the commits (pause-ms/op: first pause to last
// resume). Each VM has two disks and a guest agent (the fake agent, so
// the window is vmshadow's own sequence, not a guest's fsfreeze); ns/op
// is the whole create, delete after it not included.
func BenchmarkFreezeWindow(b *testing.B) {
	for _, n := range []int{1, 3} {
		b.Run(fmt.Sprintf("vms=%d", n), func(b *testing.B) {
			type member struct {
				vm *qemutest.VM
				ag *qgatest.Agent
			}
			var ms []member
			for i := 0; i < n; i++ {
				vm := qemutest.Start(b, qemutest.Options{Name: fmt.Sprintf("bench%d", i), Running: true,
					Disks: []qemutest.Disk{{ID: "vda"}, {ID: "vdb", Format: "raw", Size: 32 << 20}}})
				ms = append(ms, member{vm, qgatest.Start(b, qgatest.OK, "")})
			}
			dir, err := os.MkdirTemp("", "vsbench")
			if err != nil {
				b.Fatal(err)
			}
			defer os.RemoveAll(dir)
			ctx := context.Background()
			group := ""
			if n > 1 {
				group = "bench"
			}
			var freezeMS, pauseMS int64
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				var ss []*coord.Session
				for _, m := range ms {
					c := &coord.Coordinator{Provider: qemu.New(qemu.Options{QMPPath: m.vm.QMPPath, ScratchDir: dir + "/s"}),
						Writers: []coord.Writer{writer.NewAgent(m.ag.Path, nil)}, Journal: &coord.Journal{Dir: dir + "/j"}}
					s, err := c.Open(ctx)
					if err != nil {
						b.Fatal(err)
					}
					ss = append(ss, s)
				}
				b.StartTimer()
				sets, err := coord.CreateGroup(ctx, group, ss)
				b.StopTimer()
				if err != nil {
					b.Fatal(err)
				}
				freezeMS += sets[0].FreezeMS
				if sets[0].Group != nil {
					pauseMS += sets[0].Group.PauseMS
				}
				for i, s := range ss {
					if _, err := s.Delete(ctx, sets[i].ID); err != nil {
						b.Fatal(err)
					}
					s.Close()
				}
				b.StartTimer()
			}
			b.ReportMetric(float64(freezeMS)/float64(b.N), "freeze-ms/op")
			if n > 1 {
				b.ReportMetric(float64(pauseMS)/float64(b.N), "pause-ms/op")
			}
		})
	}
}
