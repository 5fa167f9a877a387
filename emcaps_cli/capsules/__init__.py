"""The maths of matrix capsules: geometry, votes, EM routing (Procedure 1), capsule layers."""
