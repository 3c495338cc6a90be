package main

import (
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/coord"
	"github.com/vmshadow/vmshadow/internal/progress"
)

func init() { commands = append(commands, newSnapshotCmd) }

func newSnapshotCmd(a *app) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "snapshot",
		Short: "Take, list and delete snapshot sets of a running VM",
		Long: `A snapshot set captures every disk of a running VM at one instant, after the
writers (the guest agent, hook scripts) froze, and exposes each disk's shadow copy
as a read-only NBD export until the set is deleted.

A XenServer / XCP-ng VM (--xapi URL --vm NAME|UUID) is captured by VM.snapshot into
a snapshot named vmshadow-<set id>; its disks are the shadow copies (snapshot VDIs,
readable over the pool's NBD in a session of your own).`,
	}
	cmd.AddCommand(newSnapshotCreateCmd(a), newSnapshotListCmd(a), newSnapshotDeleteCmd(a))
	return cmd
}

// printSet writes a set as human text.
func printSet(w io.Writer, s coord.Info) {
	freeze := "nothing froze"
	if s.FreezeMS > 0 {
		freeze = fmt.Sprintf("frozen %d ms", s.FreezeMS)
	}
	fmt.Fprintf(w, "snapshot set %s of %s: %s-consistent, %s, created %s (%s)\n", s.ID, s.VM, s.Consistency, freeze, s.Created, s.Phase)
	if g := s.Group; g != nil {
		fmt.Fprintf(w, "  part of group %s (VMs %s): the group is %s-consistent, its VMs paused together %d ms\n", g.Name, strings.Join(g.Members, ", "), g.Consistency, g.PauseMS)
	}
	for _, sh := range s.Shadows {
		where := sh.NBD
		if where == "" { // XAPI: read in a session of your own (VDI.get_nbd_info)
			where = "snapshot VDI " + sh.Node
		}
		fmt.Fprintf(w, "  %-12s %10s  %s\n", sh.Disk, progress.Bytes(sh.Size), where)
	}
	for _, wr := range s.Writers {
		if wr.Error != "" {
			fmt.Fprintf(w, "  writer %s: %s (%s)\n", wr.Name, wr.State, wr.Error)
		}
	}
}
