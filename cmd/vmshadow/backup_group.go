package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/vmshadow/vmshadow/internal/livebackup"
	"github.com/vmshadow/vmshadow/internal/repo"
	"github.com/vmshadow/vmshadow/internal/vmbackup"
)

// groupBackupSummary is the JSON summary of a group backup; field names
// are a contract.
type groupBackupSummary struct {
	Group         string          `json:"group"`
	GroupBackupID string          `json:"group_backup_id"`
	ShortID       string          `json:"short_id"`
	SetID         string          `json:"set_id"`
	Time          time.Time       `json:"time"`
	Consistency   string          `json:"consistency"`
	FreezeMS      int64           `json:"freeze_ms"`
	PauseMS       int64           `json:"pause_ms"` // how long the VMs were paused together
	Members       []backupSummary `json:"members"`
}

// groupBackup backs up the VMs of los at one instant as group name
// (vmbackup.RunGroup) and prints the summary.
func groupBackup(ctx context.Context, a *app, r *repo.Repo, name string, los []livebackup.Options, o vmbackup.Options) error {
	res, err := vmbackup.RunGroup(ctx, r, name, los, o)
	if res != nil && len(res.Members) > 0 && err != nil {
		for _, m := range res.Members {
			a.out.Warn("the backup %s of %s is stored, as an ordinary backup: the group's other VMs failed", m.ID.Short(), m.Manifest.VM)
		}
	}
	if err != nil {
		return err
	}
	s := groupBackupSummary{Group: name, GroupBackupID: res.ID.String(), ShortID: res.ID.Short(), SetID: res.Group.SetID,
		Time: res.Group.Time, Consistency: res.Group.Consistency, FreezeMS: res.Group.FreezeMS}
	for _, m := range res.Members {
		s.Members = append(s.Members, newBackupSummary(m))
		s.PauseMS = max(s.PauseMS, m.Live.Set.PauseMS)
	}
	a.out.Summary(s, func(w io.Writer) {
		fmt.Fprintf(w, "group backup %s of %s: %d VMs at one instant, %s-consistent (set %s, frozen %d ms, VMs paused together %d ms)\n",
			s.ShortID, s.Group, len(s.Members), s.Consistency, s.SetID, s.FreezeMS, s.PauseMS)
		for _, m := range s.Members {
			m.print(w)
		}
	})
	return nil
}
