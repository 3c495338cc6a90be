package server

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/vmshadow/vmshadow/internal/errs"
	"github.com/vmshadow/vmshadow/internal/server/api"
	"github.com/vmshadow/vmshadow/internal/server/state"
)

// TestPreviews: the web interface's reads and dry runs on a real server
// (its repositories empty): each bad input is refused with an error of
// its class naming the mistake; the schedule preview is the scheduler's;
// the server records a usage point of each repository at its start,
// without a job.
func TestPreviews(t *testing.T) {
	g := newRig(t, nil, `  - {name: plain, type: backup, repository: main, vms: [{connection: lab}]}
  - {name: thin, type: prune, repository: offsite, retention: {keep_daily: 7}}
  - {name: check, type: verify, repository: main}
`)
	ctx := context.Background()
	if err := g.s.Start(ctx); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		err  error
		is   error
		msg  string
	}{
		{"bad schedule", second(g.s.SchedulePreview(ctx, "0 25 * * *", "", 5)), errs.ErrUsage, `"0 25 * * *": hour 25 out of range 0-23`},
		{"bad time zone", second(g.s.SchedulePreview(ctx, "@daily", "Mars/Base", 5)), errs.ErrUsage, `time zone "Mars/Base": unknown`},
		{"empty schedule", second(g.s.SchedulePreview(ctx, " ", "", 5)), errs.ErrUsage, "empty schedule"},
		{"verify job", second(g.s.JobPrunePreview(ctx, "check")), errs.ErrUsage, "job check (verify) has no retention"},
		{"backup job without retention", second(g.s.JobPrunePreview(ctx, "plain")), errs.ErrUsage, "job plain (backup) has no retention"},
		{"unknown job", second(g.s.JobPrunePreview(ctx, "nosuch")), errs.ErrNotFound, `nosuch`},
		{"unknown repository", second(g.s.PrunePreview(ctx, "nosuch", nil, api.RetentionPolicy{Last: 1})), errs.ErrNotFound, `no repository "nosuch"`},
		{"retention keeping nothing", second(g.s.PrunePreview(ctx, "main", nil, api.RetentionPolicy{})), errs.ErrUsage, "keeps nothing"},
		{"usage of an unknown repository", second(g.s.UsageHistory(ctx, "nosuch", time.Time{})), errs.ErrNotFound, `no repository "nosuch"`},
		{"verifies of an unknown repository", second(g.s.Verifies(ctx, state.VerifyFilter{Repository: "nosuch"})), errs.ErrNotFound, `no repository "nosuch"`},
		{"gc of an unknown repository", second(g.s.GCPreview(ctx, "nosuch")), errs.ErrNotFound, `no repository "nosuch"`},
		{"libvirt restore through a QMP connection", second(g.s.Restore(ctx, api.RestoreRequest{Repository: "main", Backup: "ab",
			Libvirt: &api.LibvirtTarget{Connection: "lab", Pool: "default"}})), errs.ErrUsage, "connection lab is of type qmp: a restore into libvirt needs a libvirt connection"},
		{"pool restore through a QMP connection", second(g.s.Restore(ctx, api.RestoreRequest{Repository: "main", Backup: "ab",
			XAPI: &api.XAPITarget{Connection: "lab", SR: "Local storage"}})), errs.ErrUsage, "connection lab is of type qmp: a restore into a XenServer pool needs an xapi connection"},
		{"libvirt restore through no connection", second(g.s.Restore(ctx, api.RestoreRequest{Repository: "main", Backup: "ab",
			Libvirt: &api.LibvirtTarget{Connection: "kvm", Pool: "default"}})), errs.ErrNotFound, `no connection "kvm"`},
	} {
		if !errors.Is(c.err, c.is) || !strings.Contains(fmtErr(c.err), c.msg) {
			t.Errorf("%s: %v, want %v naming %q", c.name, c.err, c.is, c.msg)
		}
	}

	p, err := g.s.SchedulePreview(ctx, "0 2 * * *", "Europe/Berlin", 5)
	if err != nil {
		t.Fatal(err)
	}
	berlin, _ := time.LoadLocation("Europe/Berlin")
	if p.Timezone != "Europe/Berlin" || len(p.Next) != 5 {
		t.Fatalf("preview %+v", p)
	}
	for i, n := range p.Next {
		if l := n.In(berlin); l.Hour() != 2 || l.Minute() != 0 || !n.After(time.Now()) || (i > 0 && l.YearDay() == p.Next[i-1].In(berlin).YearDay()) {
			t.Errorf("time %d: %v", i, l)
		}
	}
	if p, err := g.s.SchedulePreview(ctx, "CRON_TZ=Asia/Tokyo 30 1 * * 1", "", 3); err != nil || p.Timezone != "Asia/Tokyo" || len(p.Next) != 3 || p.Next[0].UTC().Weekday() != time.Sunday {
		t.Errorf("Tokyo's Monday 01:30 is Sunday in UTC: %+v %v", p, err)
	}
	if pp, err := g.s.JobPrunePreview(ctx, "thin"); err != nil || pp.Job != "thin" || pp.Repository != "offsite" || pp.Policy.Daily != 7 || len(pp.Backups) != 0 {
		t.Errorf("prune job's preview on an empty repository: %+v %v", pp, err)
	}
	if gc, err := g.s.GCPreview(ctx, "main"); err != nil || gc.ChunksDeleted != 0 || gc.GraceS != 24*3600 {
		t.Errorf("gc preview of an empty repository: %+v %v", gc, err)
	}
	sp, err := g.s.SelectionPreview(ctx, []api.VMSelector{{Connection: "lab", VMs: []string{"web*"}}, {Connection: "xen"}, {Connection: "lab", VMs: []string{"db1"}}})
	if err != nil || len(sp.VMs) != 0 || len(sp.Problems) != 2 || !strings.Contains(sp.Problems[0], `connection "xen" is not in the configuration`) ||
		!strings.Contains(sp.Problems[1], `VM "db1" is not found (0 VMs reachable)`) {
		t.Errorf("selection preview: %+v %v", sp, err)
	}
	if cs, err := g.s.Connections(ctx); err != nil || len(cs) != 1 || cs[0] != (api.Connection{Name: "lab", Type: "qmp"}) {
		t.Errorf("connections: %+v %v", cs, err)
	}
	deadline := time.Now().Add(time.Minute)
	for {
		pts, err := g.s.UsageHistory(ctx, "offsite", time.Time{})
		if err != nil {
			t.Fatal(err)
		}
		if len(pts) == 1 && pts[0].Backups == 0 && pts[0].StoredBytes > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no usage point of offsite after the start: %+v", pts)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func second[T any](_ T, err error) error { return err }

func fmtErr(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}
