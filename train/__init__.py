"""The training machinery shared by the teacher, stage 1 and every stage-2 round."""
