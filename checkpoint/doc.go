// Package checkpoint is remora's epoch engine and both ends of its
// replication protocol.
//
// The primary end (Primary) pauses the guest each epoch, takes the pages a
// Tracker reports dirty and the device state, resumes it, and streams the
// epoch (frames: frame.go, page batches: codec.go) to the standby,
// pipelined up to MaxInFlight epochs; output commit (package outcommit)
// and the disk cut (package disk) hook into the pause. The standby end
// (Standby) reads every connection to the replication port: replication
// sessions go frame by frame into the guest's Replica, which stages an
// epoch, verifies it (counts, CRC32C) and applies it only whole; the agent
// supplies guests, shells and disks through StandbyHandler.
package checkpoint
