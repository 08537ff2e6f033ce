"""lkvision.export"""
