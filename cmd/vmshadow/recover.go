package main

import (
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"

	"github.com/vmshadow/vmshadow/internal/coord"
)

func init() { commands = append(commands, newRecoverCmd) }

func newRecoverCmd(a *app) *cobra.Command {
	var f vmFlags
	cmd := &cobra.Command{
		Use:   "recover (--qmp SOCKET [--qga SOCKET] | --xapi URL --vm NAME|UUID | --libvirt URI --vm NAME|UUID [--guest-agent])",
		Short: "Undo a snapshot set left behind by a vmshadow that was killed",
		Long: `recover thaws writers whose freeze was attempted, resumes the VM if vmshadow
paused it, removes the set's exports, filters, nodes and scratch files, and any
other vmshadow objects found in the VM. With --qga it also thaws the guest's file
systems if they are frozen. On a clean VM it does nothing.

With --xapi it removes the set's snapshot and snapshot VDIs (waiting for a
snapshot still being taken), and any other snapshot of the VM named vmshadow-*.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			ss, err := f.sessions(cmd.Context(), a, true, false)
			if err != nil {
				return err
			}
			defer func() {
				for _, s := range ss {
					s.Close()
				}
			}()
			type vmReport struct {
				VM string `json:"vm"`
				coord.RecoverReport
			}
			var reps []vmReport
			var errList []error
			if len(ss) == 1 {
				rep, err := ss[0].Recover(cmd.Context())
				if err != nil {
					return err
				}
				reps = append(reps, vmReport{ss[0].VM().Name, rep})
			} else {
				all, err := coord.RecoverGroup(cmd.Context(), ss)
				for i, rep := range all {
					reps = append(reps, vmReport{ss[i].VM().Name, rep})
				}
				errList = append(errList, err)
			}
			text := func(w io.Writer) {
				for _, rep := range reps {
					if len(rep.Thawed)+len(rep.Removed) == 0 && !rep.Resumed {
						fmt.Fprintf(w, "nothing to recover on %s\n", rep.VM)
						continue
					}
					resumed := ""
					if rep.Resumed {
						resumed = "resumed the VM, "
					}
					fmt.Fprintf(w, "recovered %s: %sthawed [%s], removed [%s]\n", rep.VM, resumed, strings.Join(rep.Thawed, ", "), strings.Join(rep.Removed, ", "))
				}
			}
			switch {
			case len(ss) == 1 && len(reps) == 1:
				a.out.Summary(reps[0].RecoverReport, text)
			case len(reps) > 0:
				a.out.Summary(struct {
					VMs []vmReport `json:"vms"`
				}{reps}, text)
			}
			return errors.Join(errList...)
		},
	}
	f.addVM(cmd)
	f.addWriters(cmd)
	return cmd
}
