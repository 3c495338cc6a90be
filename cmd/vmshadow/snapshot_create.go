package main

import (
	"io"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/coord"
)

func newSnapshotCreateCmd(a *app) *cobra.Command {
	var f vmFlags
	cmd := &cobra.Command{
		Use:   "create (--qmp SOCKET [--qga SOCKET] | --xapi URL --vm NAME|UUID | --libvirt URI --vm NAME|UUID [--guest-agent]) [--hook PATH]... [--group NAME]",
		Short: "Take a snapshot set of every disk of a running VM, or of several VMs at one instant",
		Long: `Take a snapshot set of every disk of a running VM.

With several VMs (--qmp repeated, each with its --qga in the same order, or --vm
repeated with --libvirt or --xapi, or both) and --group NAME, take one set across
all of them: every writer of every VM freezes, the VMs are paused together while
each one's disks are captured, then everything thaws. The summary is then the
group's: {"group": NAME, "set_id": ..., "sets": [one set per VM]}.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ss, err := f.sessions(cmd.Context(), a, true, true)
			if err != nil {
				return err
			}
			defer func() {
				for _, s := range ss {
					s.Close()
				}
			}()
			sets, err := coord.CreateGroup(cmd.Context(), f.group, ss)
			if err != nil {
				return err
			}
			if f.group == "" {
				info := sets[0].Info()
				a.out.Summary(info, func(w io.Writer) { printSet(w, info) })
				return nil
			}
			out := struct {
				Group string       `json:"group"`
				SetID string       `json:"set_id"`
				Sets  []coord.Info `json:"sets"`
			}{Group: f.group, SetID: sets[0].Group.SetID}
			for _, s := range sets {
				out.Sets = append(out.Sets, s.Info())
			}
			a.out.Summary(out, func(w io.Writer) {
				for _, i := range out.Sets {
					printSet(w, i)
				}
			})
			return nil
		},
	}
	f.addVM(cmd)
	f.addSet(cmd)
	return cmd
}
